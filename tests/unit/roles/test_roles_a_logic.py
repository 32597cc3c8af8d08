"""Pure logic of the GPU/fabric/storage/hardening roles (their filter plugins) and the consistency of
their defaults: the ring/tree rule, perf-output parsers, CUDA arch/driver rules, CIDR checks,
storage declarations, and the firewall's port fallbacks against the roles that own those ports."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[3] / "roles"


def _plugin(role: str, module: str):
    path = ROLES / role / "filter_plugins" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"roles_a_{role}_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _defaults(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())


def _specs(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]


nccl = _plugin("nccl", "nccl_rules")
perftest = _plugin("rdma_roce", "perftest")
cuda = _plugin("cuda", "cuda_arch")
storage = _plugin("storage_tiers", "storage")
netcheck = _plugin("hardening", "netcheck")

# ---------------------------------------------------------------- NCCL ring/tree rule


@pytest.mark.parametrize(
    ("nodes", "tree_min", "algo"),
    [(1, 4, "Ring"), (2, 4, "Ring"), (3, 4, "Ring"), (4, 4, "Tree"), (64, 4, "Tree"), (2, 2, "Tree"), (7, 8, "Ring")],
)
def test_nccl_algo_rule_switches_to_tree_at_threshold(nodes, tree_min, algo):
    assert nccl.nccl_algo(nodes, tree_min) == algo


def test_nccl_algo_single_node_is_ring_for_any_threshold():
    assert all(nccl.nccl_algo(1, t) == "Ring" for t in range(2, 50))


def test_nccl_algo_is_monotonic_in_cluster_size():
    seq = [nccl.nccl_algo(n, 4) for n in range(1, 40)]
    first_tree = seq.index("Tree")
    assert set(seq[:first_tree]) == {"Ring"} and set(seq[first_tree:]) == {"Tree"}


def test_nccl_algo_accepts_strings_from_templating():
    assert nccl.nccl_algo("8", "4") == "Tree"


@pytest.mark.parametrize(("nodes", "tree_min", "name"), [(0, 4, "nccl_cluster_nodes"), (3, 1, "nccl_tree_min_nodes")])
def test_nccl_algo_rejects_bad_input_naming_the_variable(nodes, tree_min, name):
    with pytest.raises(ValueError, match=name):
        nccl.nccl_algo(nodes, tree_min)


def test_nccl_defaults_use_the_rule_and_a_valid_threshold():
    d = _defaults("nccl")
    assert d["nccl_algo"] == "auto" and d["nccl_tree_min_nodes"] >= 2
    assert "roce_traffic_class" in d["nccl_ib_tc"] and "rdma_roce_dscp" in d["nccl_ib_tc"]
    assert "rdma_roce_gid_index" in str(d["nccl_ib_gid_index"])


ALL_REDUCE_OUT = """\
# nThread 1 nGpus 8 minBytes 8 maxBytes 134217728 step: 2(factor) warmup iters: 5 iters: 20 agg iters: 1
#
# Using devices
#  Rank  0 Group  0 Pid  41213 on     dgx-01 device  0 [0x18] NVIDIA H100 80GB HBM3
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
           8             2     float     sum      -1    29.13    0.00    0.00      0    28.70    0.00    0.00      0
     1048576        262144     float     sum      -1    40.51   25.88   45.30      0    39.87   26.30   46.03      0
   134217728      33554432     float     sum      -1    596.9  224.86  393.50      0    594.8  225.65  394.89      0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 146.6200
#
"""


def test_nccl_perf_result_reads_average_peak_and_correctness():
    r = nccl.nccl_perf_result(ALL_REDUCE_OUT)
    assert r == {"avg_busbw": 146.62, "peak_busbw": 394.89, "wrong": 0, "sizes": 3}


def test_nccl_perf_result_counts_wrong_results():
    bad = ALL_REDUCE_OUT.replace("394.89      0", "394.89      3").replace("45.30      0", "45.30      1")
    assert nccl.nccl_perf_result(bad)["wrong"] == 4


def test_nccl_perf_result_without_validation_column_values():
    out = ALL_REDUCE_OUT.replace("      0    ", "    N/A    ").replace("      0\n", "    N/A\n")
    assert nccl.nccl_perf_result(out)["wrong"] == 0


def test_nccl_perf_result_rejects_output_without_result():
    with pytest.raises(ValueError, match="Avg bus bandwidth"):
        nccl.nccl_perf_result("NCCL WARN no GPUs found\n")


# ---------------------------------------------------------------- RoCE


@pytest.mark.parametrize(("dscp", "tc"), [(26, 106), (0, 2), (63, 254), (24, 98)])
def test_roce_traffic_class_is_dscp_shifted_with_ect(dscp, tc):
    assert perftest.roce_traffic_class(dscp) == tc


@pytest.mark.parametrize("dscp", [-1, 64])
def test_roce_traffic_class_rejects_out_of_range_dscp(dscp):
    with pytest.raises(ValueError, match="rdma_roce_dscp"):
        perftest.roce_traffic_class(dscp)


def test_pfc_vector_enables_only_the_lossless_priority():
    assert perftest.pfc_vector(3) == "0,0,0,1,0,0,0,0"
    assert perftest.pfc_vector("0") == "1,0,0,0,0,0,0,0"
    with pytest.raises(ValueError, match="rdma_roce_priority"):
        perftest.pfc_vector(8)


IB_WRITE_BW = """\
---------------------------------------------------------------------------------------
                    RDMA_Write BW Test
 Dual-port       : OFF          Device         : mlx5_0
 Link type       : Ethernet
 GID index       : 3
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]
 65536      5000             196.34             195.87               0.373592
---------------------------------------------------------------------------------------
"""

IB_WRITE_LAT = """\
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   \
99% percentile[usec]   99.9% percentile[usec]
 2       1000          1.63           4.21         1.68     	       1.70        	0.06   		1.92    		4.21
---------------------------------------------------------------------------------------
"""


def test_perftest_parsers_read_average_bandwidth_and_latency():
    assert perftest.perftest_bw(IB_WRITE_BW) == 195.87
    assert perftest.perftest_lat(IB_WRITE_LAT) == 1.70


def test_perftest_parsers_fail_on_output_without_results():
    with pytest.raises(ValueError):
        perftest.perftest_bw(" Couldn't connect to 10.0.0.1:18515\n")
    with pytest.raises(ValueError):
        perftest.perftest_lat(IB_WRITE_BW)


def test_rdma_roce_defaults_form_a_consistent_lossless_class():
    d = _defaults("rdma_roce")
    assert d["rdma_roce_dscp"] != d["rdma_roce_cnp_dscp"]
    assert d["rdma_roce_priority"] != d["rdma_roce_cnp_priority"]
    assert d["rdma_roce_mtu"] == 9000
    assert d["rdma_roce_validate_max_latency_us"] <= 50  # the documents: inter-node <= 50 us
    assert set(d["rdma_roce_sysctls"]) <= {k for k in d["rdma_roce_sysctls"] if k.startswith("net.")}


# ---------------------------------------------------------------- CUDA


@pytest.mark.parametrize(
    ("generations", "expected"),
    [(["a100"], "8.0"), (["h100"], "9.0"), (["rtx4090"], "8.9"), (["t4"], "7.5"), (["orin"], "8.7"),
     (["H100", "a100", "t4"], "7.5;8.0;9.0"), (["h100", "h200"], "9.0")],
)
def test_cuda_arch_list_from_declared_generations(generations, expected):
    assert cuda.cuda_arch_list(generations, ["0x1eb8"], ["8.0"]) == expected


@pytest.mark.parametrize(
    ("device_ids", "expected"),
    [(["0x20b2"] * 8, "8.0"), (["0x2330", "0x2330"], "9.0"), (["0x2684"], "8.9"), (["0x1eb8"], "7.5"),
     (["0x2335", "0x20b0"], "8.0;9.0")],
)
def test_cuda_arch_list_from_detected_pci_ids(device_ids, expected):
    assert cuda.cuda_arch_list([], device_ids, ["8.0"]) == expected


def test_cuda_arch_list_falls_back_without_declaration_or_known_gpu():
    assert cuda.cuda_arch_list([], [], ["9.0", "8.0"]) == "8.0;9.0"
    assert cuda.cuda_arch_list([], ["0x0001"], ["8.6"]) == "8.6"


def test_cuda_arch_list_rejects_unknown_generation_naming_the_variable():
    with pytest.raises(ValueError, match="cuda_gpu_generations.*a1000"):
        cuda.cuda_arch_list(["a1000"], [], ["8.0"])


def test_cuda_arch_and_driver_rules():
    assert cuda.cuda_archs_supported("8.0;9.0", "9.0")
    assert not cuda.cuda_archs_supported("8.0;10.0", "9.0")
    assert cuda.cuda_archs_supported("9.0;10.0;12.0", "12.1", "7.5")
    assert not cuda.cuda_archs_supported("7.0;9.0", "12.1", "7.5")  # V100 on CUDA 13
    assert cuda.cuda_driver_ok("535", 520) and not cuda.cuda_driver_ok("535", 550)


# NVIDIA's CUDA release notes (Table 3, minimum driver for toolkit and compute capabilities), typed here.
CUDA_RELEASES = {
    "11.8": (520, "3.5", "9.0"),
    "12.2": (535, "5.0", "9.0"),
    "12.4": (550, "5.0", "9.0"),
    "12.8": (570, "5.0", "12.0"),
    "13.0": (580, "7.5", "12.1"),
}


def test_cuda_matrix_holds_the_published_driver_and_arch_bounds():
    matrix = _defaults("cuda")["cuda_matrix"]
    assert {v: (e["min_driver"], e["min_arch"], e["max_arch"]) for v, e in matrix.items()} == CUDA_RELEASES


def test_driver_branches_reach_580():
    branches = _specs("nvidia_driver")["main"]["options"]["nvidia_driver_branch"]["choices"]
    assert branches == ["470", "535", "550", "570", "575", "580"]


@pytest.mark.parametrize(("device_id", "arch"), [("0x2335", "9.0"), ("0x2330", "9.0"), ("0x2901", "10.0"),
                                                 ("0x2b85", "12.0"), ("0x2342", "9.0")])
def test_h200_and_blackwell_pci_ids(device_id, arch):
    assert cuda.device_id_arch(device_id) == arch


def test_cuda_matrix_is_consistent_with_driver_and_nccl():
    d, specs = _defaults("cuda"), _specs("nvidia_driver")
    branches = specs["main"]["options"]["nvidia_driver_branch"]["choices"]
    default_branch = _defaults("nvidia_driver")["nvidia_driver_branch"]
    assert default_branch in branches
    assert d["cuda_version"] == "11.8"  # the source documents
    matrix = d["cuda_matrix"]
    assert cuda.cuda_driver_ok(default_branch, matrix[d["cuda_version"]]["min_driver"])
    assert any("cudnn8=8.6" in p for p in matrix["11.8"]["cudnn"])  # cuDNN 8.6 with CUDA 11.8
    for version, entry in matrix.items():
        suffix = version.replace(".", "-")
        assert entry["toolkit"].endswith(suffix) and entry["runtime"].endswith(suffix)
        assert any(int(b) >= entry["min_driver"] for b in branches), version
    # every CUDA release has pinned NCCL packages built for it
    nccl_pkgs = _defaults("nccl")["nccl_packages_by_cuda"]
    assert set(nccl_pkgs) == set(matrix)
    for version, pkgs in nccl_pkgs.items():
        assert all(p.endswith(f"+cuda{version}") for p in pkgs)


# ---------------------------------------------------------------- storage tiers


@pytest.mark.parametrize("path", ["/models", "/var/log/deepfleet", "/a-b/c.d", "/srv/x_y:z", "/data/ünï"])
def test_systemd_mount_unit_matches_systemd_escape(path):
    name = storage.systemd_mount_unit(path)
    if shutil.which("systemd-escape"):
        out = subprocess.run(["systemd-escape", "--path", "--suffix=mount", path], capture_output=True, text=True)
        assert name == out.stdout.strip()
    assert name.endswith(".mount") and "/" not in name


def test_storage_tiers_list_builds_raid_only_for_several_devices():
    tiers = storage.storage_tiers_list({
        "hot": {"devices": ["/dev/nvme0n1", "/dev/nvme1n1"], "mount": "/models"},
        "warm": {"devices": [], "mount": "/cache"},
        "cold": {"devices": ["/dev/sdc"], "mount": "/logs"},
    })
    assert [t["name"] for t in tiers] == ["hot", "cold"]
    assert tiers[0]["raid"] and tiers[0]["target"] == "/dev/md/deepfleet-hot"
    assert not tiers[1]["raid"] and tiers[1]["target"] == "/dev/sdc" and tiers[1]["label"] == "df-cold"


def test_storage_tiers_problems_name_the_variable():
    tiers = storage.storage_tiers_list({
        "hot": {"devices": ["/dev/nvme0n1", "nvme1n1"], "mount": "/models"},
        "warm": {"devices": ["/dev/nvme0n1"], "mount": "/models"},
        "cold": {"devices": ["/dev/sdc"], "mount": "/"},
    })
    problems = storage.storage_tiers_problems(tiers)
    assert "storage_tiers_hot_devices: 'nvme1n1' is not a /dev path" in problems
    assert "storage_tiers_warm_devices: /dev/nvme0n1 is already used by storage_tiers_hot_devices" in problems
    assert "storage_tiers_warm_mount: /models is already the mount point of storage_tiers_hot_mount" in problems
    assert any(p.startswith("storage_tiers_cold_mount:") for p in problems)
    assert storage.storage_tiers_problems(storage.storage_tiers_list({})) == []


# ---------------------------------------------------------------- hardening


def test_cidr_problems_accepts_networks_and_names_the_variable_for_bad_ones():
    assert netcheck.cidr_problems(["10.77.0.0/24", "0.0.0.0/0", "fd00::/8"], "deepfleet_allowed_networks") == []
    problems = netcheck.cidr_problems(["10.0.0.5/24", "300.1.1.0/24", "10.0.0.1", "nonsense"], "v")
    assert len(problems) == 4 and all(p.startswith("v: ") for p in problems)
    assert netcheck.cidr_problems("10.0.0.0/8", "deepfleet_allowed_networks") == [
        "deepfleet_allowed_networks must be a list of CIDR networks, got '10.0.0.0/8'"
    ]


def test_cidrs_of_family_splits_v4_and_v6():
    nets = ["10.0.0.0/8", "fd00::/8", "192.168.1.0/24"]
    assert netcheck.cidrs_of_family(nets, 4) == ["10.0.0.0/8", "192.168.1.0/24"]
    assert netcheck.cidrs_of_family(nets, "6") == ["fd00::/8"]


def test_hardening_port_fallbacks_equal_the_owning_roles_defaults():
    """The firewall opens `role_var | default(N)`: N must be the owning role's default, so an inventory that
    sets nothing gets the same port in the service and in the firewall."""
    d = _defaults("hardening")
    ports = {**d["hardening_admin_tcp_ports"], **d["hardening_client_tcp_ports"]}
    checked = 0
    for value in ports.values():
        m = re.fullmatch(r"\{\{ (\w+) \| default\((\d+)\) \}\}", str(value))
        if not m:
            continue
        var, fallback = m.group(1), int(m.group(2))
        owner = next(r for r in ("monitoring", "loadbalancer") if var.startswith(r + "_"))
        assert _defaults(owner)[var] == fallback, var
        checked += 1
    assert checked >= 5
    assert d["hardening_admin_tcp_ports"]["ssh"] == 22
    assert d["hardening_admin_tcp_ports"]["api"] == "{{ deepfleet_api_port }}"
