"""Pure logic of the rdma_roce role, importable by pytest: parsers for perftest (ib_write_bw,
ib_write_lat) output, the PFC priority vector and the RoCE traffic class."""


def _rows(stdout):
    rows = []
    for line in stdout.splitlines():
        cols = line.split()
        if cols and cols[0].isdigit():
            try:
                rows.append([float(c) for c in cols])
            except ValueError:
                continue
    return rows


def perftest_bw(stdout):
    """Average bandwidth in Gb/s of the largest message size of `ib_write_bw --report_gbits`
    (columns: bytes, iterations, BW peak, BW average, MsgRate)."""
    rows = [r for r in _rows(stdout) if len(r) == 5]
    if not rows:
        raise ValueError("no result row in the ib_write_bw output (was --report_gbits given?)")
    return rows[-1][3]


def perftest_lat(stdout):
    """Average latency in microseconds from `ib_write_lat` (columns: bytes, iterations, t_min, t_max,
    t_typical, t_avg, t_stdev, 99%, 99.9%)."""
    rows = [r for r in _rows(stdout) if len(r) == 9]
    if not rows:
        raise ValueError("no result row in the ib_write_lat output")
    return rows[-1][5]


def roce_traffic_class(dscp):
    """IP TOS byte of RoCE traffic (NCCL_IB_TC, rdma_cm default_roce_tos): DSCP << 2 | ECT(0), so
    switches can ECN-mark it for DCQCN."""
    dscp = int(dscp)
    if not 0 <= dscp <= 63:
        raise ValueError(f"rdma_roce_dscp must be 0..63, got {dscp}")
    return dscp << 2 | 0b10


def pfc_vector(priority):
    """Per-priority PFC enable list for priorities 0..7 with only `priority` lossless (mlnx_qos --pfc)."""
    priority = int(priority)
    if not 0 <= priority <= 7:
        raise ValueError(f"rdma_roce_priority must be 0..7, got {priority}")
    return ",".join("1" if p == priority else "0" for p in range(8))


class FilterModule:
    def filters(self):
        return {"perftest_bw": perftest_bw, "perftest_lat": perftest_lat, "pfc_vector": pfc_vector,
                "roce_traffic_class": roce_traffic_class}
