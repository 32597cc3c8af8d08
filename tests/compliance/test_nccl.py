"""What roles/nccl does: /etc/nccl.conf with the interface/HCA settings and the ring/tree rule applied to
the cluster size; on GPU hosts the NCCL library and the nccl-tests binaries."""

from __future__ import annotations

import pytest


@pytest.fixture
def nccl_conf(host) -> dict[str, str]:
    f = host.file("/etc/nccl.conf")
    assert f.is_file and f.mode == 0o644
    return dict(line.split("=", 1) for line in f.content_string.splitlines() if line and not line.startswith("#"))


def _cluster_nodes(inventory: dict, nccl: dict) -> int:
    configured = nccl["nccl_cluster_nodes"]
    if isinstance(configured, int):
        return configured
    return len(inventory["groups"].get("gpu_nodes", [])) or 1


def test_nccl_algorithm_follows_the_cluster_size_rule(inventory, role_settings, nccl_conf):
    nccl = role_settings("nccl")
    if nccl["nccl_algo"] == "nccl_default":
        assert "NCCL_ALGO" not in nccl_conf
        return
    expected = nccl["nccl_algo"]
    if expected == "auto":
        # the documented rule: Ring below nccl_tree_min_nodes nodes, Tree from there on
        expected = "Tree" if _cluster_nodes(inventory, nccl) >= int(nccl["nccl_tree_min_nodes"]) else "Ring"
    assert nccl_conf["NCCL_ALGO"] == expected


def test_nccl_transport_settings(role_settings, nccl_conf):
    nccl, roce = role_settings("nccl"), role_settings("rdma_roce")
    assert nccl_conf["NCCL_DEBUG"] == nccl["nccl_debug"]
    if nccl["nccl_socket_ifname"]:
        assert nccl_conf["NCCL_SOCKET_IFNAME"] == nccl["nccl_socket_ifname"]
    if not nccl["nccl_ib_hca"]:
        assert nccl_conf["NCCL_IB_DISABLE"] == "1" and "NCCL_IB_HCA" not in nccl_conf
        return
    assert nccl_conf["NCCL_IB_DISABLE"] == "0"
    assert nccl_conf["NCCL_IB_HCA"] == ",".join(nccl["nccl_ib_hca"])
    tc = nccl["nccl_ib_tc"]
    if not isinstance(tc, int):  # the default derives from the RoCE class
        tc = int(roce["rdma_roce_dscp"]) * 4 + 2  # DSCP in the upper six bits of the ToS byte, ECT(0) set
    assert int(nccl_conf["NCCL_IB_TC"]) == tc
    gid = nccl["nccl_ib_gid_index"]
    assert int(nccl_conf["NCCL_IB_GID_INDEX"]) == (gid if isinstance(gid, int) else roce["rdma_roce_gid_index"])


def test_gpu_nccl_library_and_tests(host, role_settings, gpu_host):
    nccl = role_settings("nccl")
    assert "libnccl.so.2" in host.check_output("ldconfig -p")
    if host.file("/usr/local/cuda/bin/nvcc").exists:
        perf = host.file(f"{nccl['nccl_tests_dir']}/build/all_reduce_perf")
        assert perf.is_file and perf.mode & 0o111
