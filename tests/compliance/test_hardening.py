"""What roles/hardening does: inbound default-deny with SSH/API/metrics open only to the declared networks
(checked with real connections from this controller), key-only sshd (the running daemon refuses passwords),
audit rules for models and configuration, security-only unattended upgrades."""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path

import pytest
import yaml

SHARED_VARS = Path(__file__).resolve().parents[2] / "playbooks" / "group_vars" / "all"


@pytest.fixture
def hd(role_settings) -> dict:
    return role_settings("hardening")


def _api_port(inventory: dict) -> int:
    if "deepfleet_api_port" in inventory:
        return int(inventory["deepfleet_api_port"])
    for f in sorted(SHARED_VARS.glob("*.yml")):
        shared = yaml.safe_load(f.read_text()) or {}
        if "deepfleet_api_port" in shared:
            return int(shared["deepfleet_api_port"])
    raise AssertionError("deepfleet_api_port is defined nowhere")


def _connects(addr: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def test_firewall_loaded_with_default_deny(host, hd, inventory, inventory_value):
    assert host.service("nftables").is_enabled and host.service("nftables").is_running
    table = host.check_output("nft list table inet deepfleet")
    assert "hook input priority filter; policy drop;" in table
    allowed = inventory_value("deepfleet_allowed_networks")
    for net in allowed:
        n = ipaddress.ip_network(net)
        assert str(n) in table or (n.prefixlen == n.max_prefixlen and str(n.network_address) in table), net
    assert f"{_api_port(inventory)}" in table and "22" in table


def test_firewall_drops_an_undeclared_port(host, inventory_value):
    """A listener on a port nobody declared is unreachable from here, while SSH (declared) is reachable."""
    if host.backend.get_connection_type() == "local":
        pytest.skip("local://: the probe must connect from another machine inside deepfleet_allowed_networks")
    addr = inventory_value("ansible_host")
    port = 18999
    unit = "deepfleet-compliance-probe"
    host.run(f"systemctl stop {unit} 2>/dev/null; systemctl reset-failed {unit} 2>/dev/null")
    started = host.run(
        f"systemd-run --unit {unit} -p RuntimeMaxSec=60 python3 -c "
        f"\"import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('0.0.0.0', {port})); s.listen(); time.sleep(60)\""
    )
    assert started.rc == 0, started.stderr
    try:
        for _ in range(50):
            if f":{port} " in host.check_output("ss -ltnH"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("probe listener did not start")
        assert host.run(f"timeout 3 bash -c 'echo > /dev/tcp/127.0.0.1/{port}'").rc == 0, "listener unusable locally"
        assert not _connects(addr, port), f"undeclared port {port} is reachable from the controller"
        assert _connects(addr, 22), "SSH is not reachable from the controller"
    finally:
        host.run(f"systemctl stop {unit}")


def test_sshd_config_is_key_only(host, hd):
    effective = dict(line.split(" ", 1) for line in host.check_output("sshd -T").splitlines() if " " in line)
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitemptypasswords"] == "no"
    expected_root = {"prohibit-password": "without-password", "no": "no"}[hd["hardening_ssh_permit_root_login"]]
    assert effective["permitrootlogin"] == expected_root
    assert effective["maxauthtries"] == str(hd["hardening_ssh_max_auth_tries"])


def test_running_sshd_refuses_passwords(host):
    # "; echo": ssh's own exit code 255 would read as a transport error to testinfra
    out = host.run(
        "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o PubkeyAuthentication=no "
        "-o PreferredAuthentications=password,keyboard-interactive root@127.0.0.1 true; echo rc=$?"
    )
    assert out.stdout.strip() == "rc=255"
    # the server offers public keys only: no password or keyboard-interactive method in the list
    assert "Permission denied (publickey)." in out.stderr, out.stderr


def test_audit_rules(host, hd):
    rules = host.file("/etc/audit/rules.d/deepfleet.rules")
    assert rules.is_file and rules.mode == 0o640
    for path, key in hd["hardening_audit_watches"].items():
        assert f"-w {path} -p wa -k {key}" in rules.content_string.splitlines()
    if host.run("systemd-detect-virt --container").rc == 0:
        assert not host.service("auditd").is_enabled
        pytest.skip("container: kernel auditing belongs to the host, loaded rules not checked")
    assert host.service("auditd").is_running
    loaded = host.check_output("auditctl -l")
    for key in set(hd["hardening_audit_watches"].values()):
        assert f"-k {key}" in loaded or f"key={key}" in loaded, key


def test_unattended_security_upgrades(host, hd):
    assert host.package("unattended-upgrades").is_installed
    conf = host.check_output("apt-config dump")
    assert 'APT::Periodic::Unattended-Upgrade "1";' in conf
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in conf
    assert "-security" in conf
    for pkg in hd["hardening_unattended_blacklist"]:
        assert f'Unattended-Upgrade::Package-Blacklist:: "{pkg}";' in conf, pkg
