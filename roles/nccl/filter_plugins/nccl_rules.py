"""Pure logic of the nccl role, importable by pytest: the ring/tree rule and the all_reduce_perf
result parser used by the validation play."""

import re

VALID_ALGOS = ("Ring", "Tree")


def nccl_algo(nodes, tree_min_nodes):
    """NCCL_ALGO by cluster size. Ring moves the most bytes per link but its latency grows linearly
    with the number of ranks (2(n-1) steps); the double binary tree grows with log2(n). Inside one node
    NVLink/NVSwitch make Ring the bandwidth winner, and across a few nodes the ring's extra steps cost
    less than the tree's halved per-link bandwidth; from `tree_min_nodes` nodes on, Tree."""
    nodes, tree_min_nodes = int(nodes), int(tree_min_nodes)
    if nodes < 1:
        raise ValueError(f"nccl_cluster_nodes must be >= 1, got {nodes}")
    if tree_min_nodes < 2:
        raise ValueError(f"nccl_tree_min_nodes must be >= 2, got {tree_min_nodes}")
    return "Tree" if nodes >= tree_min_nodes else "Ring"


_AVG = re.compile(r"^#\s*Avg bus bandwidth\s*:\s*([0-9.]+)", re.MULTILINE)


def nccl_perf_result(stdout):
    """Parse nccl-tests output: average bus bandwidth (GB/s), peak busbw and the count of wrong results
    (the #wrong columns of out-of-place and in-place). Raises when the output has no result."""
    match = _AVG.search(stdout)
    if not match:
        raise ValueError("no '# Avg bus bandwidth' line in the nccl-tests output")
    peak, wrong, rows = 0.0, 0, 0
    for line in stdout.splitlines():
        cols = line.split()
        if len(cols) == 13 and cols[0].isdigit():
            rows += 1
            peak = max(peak, float(cols[7]), float(cols[11]))
            wrong += sum(int(c) for c in (cols[8], cols[12]) if c.isdigit())
    return {"avg_busbw": float(match.group(1)), "peak_busbw": peak, "wrong": wrong, "sizes": rows}


class FilterModule:
    def filters(self):
        return {
            "nccl_algo": nccl_algo,
            "nccl_perf_result": nccl_perf_result,
        }
