"""What roles/common does: time sync, base packages, kernel parameters, file limits, service user."""

from __future__ import annotations

import pytest


def _words(value) -> str:
    return " ".join(str(value).split())


def _settings(text: str) -> dict[str, str]:
    """`key = value` lines of a sysctl.d file (comments and blank lines skipped)."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out[key.strip()] = _words(value)
    return out


def test_timesyncd_installed_configured_enabled(host, common):
    assert host.package("systemd-timesyncd").is_installed
    conf = host.file("/etc/systemd/timesyncd.conf.d/60-deepfleet.conf")
    assert conf.is_file and conf.user == "root" and conf.mode == 0o644
    lines = conf.content_string.splitlines()
    assert "NTP=" + " ".join(common["common_ntp_servers"]) in lines
    assert "FallbackNTP=" + " ".join(common["common_ntp_fallback_servers"]) in lines
    assert host.service("systemd-timesyncd").is_enabled


def test_timesyncd_running_outside_containers(host, in_container):
    if in_container:
        pytest.skip("systemd-timesyncd does not run in a container (ConditionVirtualization=!container)")
    assert host.service("systemd-timesyncd").is_running


def test_base_packages_installed(host, common):
    missing = [p for p in common["common_base_packages"] if not host.package(p).is_installed]
    assert not missing, f"not installed: {missing}"


def test_sysctl_file(host, common):
    f = host.file("/etc/sysctl.d/60-deepfleet.conf")
    assert f.is_file and f.user == "root" and f.mode == 0o644
    assert _settings(f.content_string) == {k: _words(v) for k, v in common["common_sysctl"].items()}


def test_sysctl_live_values(host, common, in_container):
    """Live values where the host may set them; read-only /proc/sys is accepted only inside a container."""
    readonly = []
    for key, want in common["common_sysctl"].items():
        if host.run(f"test -w /proc/sys/{key.replace('.', '/')}").rc != 0:
            assert in_container, f"{key} is read-only on a host that is not a container"
            readonly.append(key)
            continue
        assert _words(host.sysctl(key)) == _words(want), key
    if len(readonly) == len(common["common_sysctl"]):
        pytest.skip(f"container: /proc/sys is read-only, only the file is checked ({', '.join(readonly)})")


def test_file_limits(host, common):
    n, memlock, user = common["common_nofile_limit"], common["common_memlock_limit"], common["common_service_user"]
    limits = host.file("/etc/security/limits.d/60-deepfleet.conf")
    assert limits.is_file and limits.mode == 0o644
    lines = {_words(line) for line in limits.content_string.splitlines()}
    assert {f"* soft nofile {n}", f"* hard nofile {n}", f"{user} soft memlock {memlock}",
            f"{user} hard memlock {memlock}"} <= lines
    manager = host.run("systemctl show --property DefaultLimitNOFILE --value")
    assert manager.rc == 0 and manager.stdout.strip() == str(n), "systemd has not picked up DefaultLimitNOFILE"


def test_service_user(host, common):
    name, home = common["common_service_user"], common["common_service_home"]
    user = host.user(name)
    assert user.exists
    assert user.uid < 1000, "not a system user"
    assert user.group == name
    assert user.shell == "/usr/sbin/nologin"
    assert user.home == home
    assert host.run(f"passwd --status {name}").stdout.split()[1] == "L", "password login not locked"
    d = host.file(home)
    assert d.is_directory and d.user == name and d.group == name and d.mode == 0o750
