"""What roles/rdma_roce does: RDMA user space, the RoCE sysctls, the deepfleet-roce script with its plan and
boot unit; on hosts with an RDMA NIC, the lossless settings on the declared interfaces."""

from __future__ import annotations

import pytest


@pytest.fixture
def roce(role_settings) -> dict:
    return role_settings("rdma_roce")


def _rdma_interfaces(host, roce) -> list[tuple[str, str]]:
    out = []
    for iface in roce["rdma_roce_interfaces"]:
        dev = host.run(f"ls /sys/class/net/{iface['name']}/device/infiniband 2>/dev/null").stdout.split()
        if dev:
            out.append((iface["name"], dev[0]))
    return out


def test_rdma_packages(host, roce):
    for pkg in roce["rdma_roce_packages"]:
        assert host.package(pkg).is_installed, pkg
    assert host.exists("ib_write_bw") and host.exists("ib_write_lat")


def test_roce_sysctls_written(host, roce):
    f = host.file("/etc/sysctl.d/60-deepfleet-roce.conf")
    assert f.is_file and f.mode == 0o644
    written = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in f.content_string.splitlines()
                                                   if line and not line.startswith("#"))}
    assert written == {k: str(v) for k, v in roce["rdma_roce_sysctls"].items()}


def test_roce_sysctls_applied(host, roce):
    if host.run("test -w /proc/sys/net/ipv4/tcp_ecn").rc != 0:
        pytest.skip("/proc/sys is read-only here (container): settings apply on the host at boot")
    for key, value in roce["rdma_roce_sysctls"].items():
        assert host.sysctl(key) == value, key


def test_fabric_plan_names_the_lossless_class(host, roce):
    plan = host.run("/usr/local/sbin/deepfleet-roce plan")
    assert plan.rc == 0, plan.stderr
    assert (f"DSCP {roce['rdma_roce_dscp']} -> priority {roce['rdma_roce_priority']} (PFC on)" in plan.stdout)
    assert f"MTU {roce['rdma_roce_mtu']}" in plan.stdout
    for iface in roce["rdma_roce_interfaces"]:
        assert f"interface {iface['name']}" in plan.stdout
    assert host.run("/usr/local/sbin/deepfleet-roce bogus").rc == 2


def test_roce_boot_unit(host, roce):
    svc = host.service("deepfleet-roce")
    if roce["rdma_roce_mode"] == "apply":
        assert svc.is_enabled
        assert host.check_output("systemctl show -p Result --value deepfleet-roce") == "success"
    else:
        assert not svc.is_enabled


def test_rdma_nics_lossless(host, roce):
    nics = _rdma_interfaces(host, roce)
    if not nics or roce["rdma_roce_mode"] != "apply":
        pytest.skip("no declared interface with an RDMA device here (or plan mode)")
    prio = roce["rdma_roce_priority"]
    for name, rdma in nics:
        assert int(host.file(f"/sys/class/net/{name}/mtu").content_string) == roce["rdma_roce_mtu"]
        if host.exists("mlnx_qos"):
            qos = host.check_output(f"mlnx_qos -i {name}")
            assert "Priority trust state: dscp" in qos
        else:
            pfc = host.check_output(f"dcb pfc show dev {name} prio-pfc")
            assert f"{prio}:on" in pfc and pfc.count(":on") == 1
        if roce["rdma_roce_ecn"]:
            assert host.file(f"/sys/class/net/{name}/ecn/roce_np/enable/{prio}").content_string.strip() == "1"
        mode = host.file(f"/sys/kernel/config/rdma_cm/{rdma}/ports/1/default_roce_mode").content_string
        assert mode.strip() == "RoCE v2"
