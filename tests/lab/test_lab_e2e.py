"""Lab end-to-end: real systemd hosts, the converge playbook twice (second run changes nothing), the
compliance suite, network isolation, apt through the proxy, and a teardown that leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab import disks, instance, teardown
from lab.config import REPO
from lab.converge import changed_tasks
from lab.state import load

# The first test also pays for the session fixture: a cold root filesystem build and the first converge.
pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

MODEL_DIR = "/models/tiny-qwen2/current"  # inference_runtime_model_dir: the revision served

# Units allowed to fail inside an nspawn container, each with the reason. Add one only with a real reason.
CONTAINER_EXPECTED_FAILURES: dict[str, str] = {
    "auditd.service": "the kernel's audit subsystem belongs to the host: auditd cannot run inside a container",
}


def test_hosts_boot_systemd_as_pid1(lab):
    for host in lab.hosts:
        assert lab.ssh(host, "ps -p 1 -o comm=").stdout.strip() == "systemd", host.name
        state = lab.ssh(host, "systemctl is-system-running --wait").stdout.strip()
        if state == "degraded":
            failed = set(lab.ssh(host, "systemctl list-units --failed --plain --no-legend | cut -d' ' -f1")
                         .stdout.split())
            unexpected = failed - set(CONTAINER_EXPECTED_FAILURES)
            assert not unexpected, f"{host.name} degraded by failed units: {sorted(unexpected)}"
        else:
            assert state == "running", f"{host.name}: {state}"
        assert lab.ssh(host, "hostname").stdout.strip() == host.name


def test_second_converge_changes_nothing(lab):
    rc, recap, seconds = lab.site()
    lab.timings["second converge"] = seconds
    assert rc == 0
    assert set(recap) == {h.name for h in lab.hosts}
    changed = {h: c["changed"] for h, c in recap.items() if c["changed"] or c["failed"] or c["unreachable"]}
    assert not changed, f"{lab.playbook.name} is not idempotent: {changed_tasks(lab.last_output)} {recap}"


def test_compliance_suite_passes(lab):
    rc, summary, seconds = lab.compliance()
    lab.timings["compliance"] = seconds
    assert rc == 0, summary


def test_storage_tiers_are_xfs_on_the_lab_loop_devices(lab):
    """`lab up` gives every host a loop device per tier, the inventory declares them, site.yml builds XFS tiers
    on them, the model lands on the hot tier, and the compliance storage checks run (none skipped)."""
    mounts = {"hot": "/models", "warm": "/cache", "cold": "/logs"}
    for host in lab.hosts:
        devices = disks.tier_devices(lab.state, host.name)
        assert set(devices) == set(mounts), f"{host.name}: {devices}"
        for tier, [dev] in devices.items():
            found = lab.ssh(host, f"findmnt -no SOURCE,FSTYPE,OPTIONS {mounts[tier]}").stdout.split()
            assert found[:2] == [dev, "xfs"] and "noatime" in found[2].split(","), (host.name, tier, found)
        # inference_runtime_model_dir (roles/inference_runtime defaults): /models/<model name>; the lab's model is
        # encrypted (lab/objectstore.py): config.json is there as its ciphertext
        model = lab.ssh(host, f"findmnt -no TARGET --target {MODEL_DIR} && test -f {MODEL_DIR}/config.json.dfenc")
        assert model.returncode == 0 and model.stdout.strip() == "/models", (host.name, model.stdout, model.stderr)
    rc, summary, _ = lab.compliance("-k", "test_declared_tiers_are_mounted_xfs", "-rs")
    assert rc == 0 and f"{len(lab.hosts)} passed" in summary and "skipped" not in summary, summary


def test_hosts_have_only_the_lab_route(lab):
    """No default route, one IPv4 route (the lab subnet); checked on the routing table, no probe packets out."""
    for host in lab.hosts:
        routes = json.loads(lab.ssh(host, "ip -j -4 route show table all").stdout)
        main = [r for r in routes if r.get("table", "main") == "main"]
        assert [r["dst"] for r in main] == [lab.state.subnet], f"{host.name}: {main}"
        assert lab.ssh(host, "ip -6 route show default").stdout.strip() == ""
        links = [link["ifname"] for link in json.loads(lab.ssh(host, "ip -j link").stdout)]
        assert sorted(links) == ["eth0", "lo"], f"{host.name}: {links}"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0", "the lab must not turn on forwarding"


def test_hosts_reach_each_other_and_the_proxy_only(lab):
    """Lab addresses only: the other host's SSH (open), the proxy (open), the controller's SSH (blocked)."""
    first, last = lab.hosts[0], lab.hosts[-1]
    probe = "timeout 3 bash -c 'echo > /dev/tcp/{}/{}' && echo open || echo closed"
    assert lab.ssh(first, probe.format(last.ip, 22)).stdout.strip() == "open"
    assert lab.ssh(first, probe.format(lab.state.bridge_ip, lab.state.apt_port)).stdout.strip() == "open"
    assert lab.ssh(first, probe.format(lab.state.bridge_ip, 22)).stdout.strip() == "closed"


def test_apt_goes_through_the_lab_proxy(lab):
    host = lab.hosts[0]
    conf = lab.ssh(host, "apt-config dump Acquire::http::Proxy APT::Install-Recommends").stdout
    assert f'Acquire::http::Proxy "{lab.state.apt_proxy}";' in conf
    assert 'APT::Install-Recommends "false";' in conf
    rc = lab.ssh(host, "cd /tmp && apt-get update -qq && apt-get download -qq hello && rm -f hello_*.deb")
    assert rc.returncode == 0, rc.stderr
    log = Path(lab.state.state_dir, "apt-proxy", "log", "apt-cacher.log").read_text()
    assert f"|{host.ip}|debrep/pool/main/h/hello/" in log, "the download did not go through the lab's apt proxy"


def test_port_clash_is_refused_before_anything_is_created(lab):
    cp = subprocess.run([sys.executable, "-m", "lab", "up", "--name", "pytest-clash", "--apt-port",
                         str(lab.state.apt_port)], cwd=REPO, capture_output=True, text=True)
    assert cp.returncode == 2
    assert "port clash" in cp.stderr and "fix:" in cp.stderr
    assert load("pytest-clash") is None


def test_down_removes_everything_it_recorded(lab):
    """A second, one-host instance beside the session's: up, down, then nothing it recorded exists."""
    state = instance.up("pytest-down", hosts=1)
    assert state.subnet != lab.state.subnet and state.apt_port != lab.state.apt_port
    recorded = list(state.resources)
    kinds = {r["kind"] for r in recorded}
    assert {"bridge", "veth", "netns", "process", "mount", "cgroup", "nft", "path", "loop"} <= kinds
    images = [r["file"] for r in recorded if r["kind"] == "loop"]
    assert len(images) == 3 and all(disks.backed_by(f) for f in images), images
    assert instance.down("pytest-down")
    # processes (by PID + start time) and their cgroups, mounts, netns, veths, bridge, nft table, loop devices,
    # files
    assert teardown.remaining(recorded) == []
    assert not any(disks.backed_by(f) or Path(f).exists() for f in images), "a loop device or its file is left"
    assert not Path(state.state_dir).exists()
    assert lab.ssh(lab.hosts[0], "true").returncode == 0, "taking down one lab must not touch another"

