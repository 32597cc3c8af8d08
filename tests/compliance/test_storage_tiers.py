"""What roles/storage_tiers does: each declared tier is XFS on its device (md RAID0 for several), mounted
with the tier options through a systemd mount unit; logs rotate to the cold tier."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "roles" / "storage_tiers" / "filter_plugins" / "storage.py"
_spec = importlib.util.spec_from_file_location("compliance_storage", PLUGIN)
storage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(storage)


@pytest.fixture
def st(role_settings) -> dict:
    return role_settings("storage_tiers")


def _tiers(st: dict) -> list[dict]:
    return storage.storage_tiers_list({t: {"devices": st[f"storage_tiers_{t}_devices"],
                                           "mount": st[f"storage_tiers_{t}_mount"]} for t in ("hot", "warm", "cold")})


def test_declared_tiers_are_mounted_xfs(host, st):
    tiers = _tiers(st)
    if not tiers:
        pytest.skip("no storage devices declared for this host (storage_tiers_*_devices)")
    for tier in tiers:
        mp = host.mount_point(tier["mount"])
        assert mp.exists, f"{tier['mount']} is not mounted"
        assert mp.filesystem == "xfs"
        assert set(st["storage_tiers_mount_options"].split(",")) <= set(mp.options)
        assert host.check_output(f"blkid -o value -s LABEL {tier['target']}") == tier["label"]
        # the mount is the tier's device (md arrays appear as /dev/mdN)
        source = host.check_output(f"findmnt -no SOURCE --target {tier['mount']}")
        assert host.check_output(f"readlink -f {source}") == host.check_output(f"readlink -f {tier['target']}")
        unit = storage.systemd_mount_unit(tier["mount"])
        assert host.service(unit).is_enabled and host.service(unit).is_running, unit


def test_raid_tiers_are_raid0_over_all_devices(host, st):
    raid = [t for t in _tiers(st) if t["raid"]]
    if not raid:
        pytest.skip("no tier with several devices here")
    for tier in raid:
        detail = host.check_output(f"mdadm --detail {tier['target']}")
        assert "Raid Level : raid0" in detail
        assert f"Raid Devices : {len(tier['devices'])}" in detail
        assert host.file("/etc/mdadm/mdadm.conf").contains(f"^ARRAY {tier['target']} ")


def test_logs_rotate_to_the_archive(host, st):
    conf = host.file("/etc/logrotate.d/deepfleet")
    assert conf.is_file
    archive = (f"{st['storage_tiers_cold_mount']}/deepfleet-archive" if st["storage_tiers_cold_devices"]
               else f"{st['storage_tiers_log_dir']}/archive")
    assert f"olddir {archive}" in conf.content_string
    assert host.file(archive).is_directory and host.file(st["storage_tiers_log_dir"]).is_directory
    debug = host.run("logrotate --debug /etc/logrotate.d/deepfleet")
    assert debug.rc == 0, debug.stderr
    assert f"olddir is {archive}" in debug.stdout + debug.stderr


def test_logrotate_moves_a_rotated_log_to_the_archive(host, st):
    """A forced rotation of a scratch log (own state file) lands in the archive directory."""
    archive = (f"{st['storage_tiers_cold_mount']}/deepfleet-archive" if st["storage_tiers_cold_devices"]
               else f"{st['storage_tiers_log_dir']}/archive")
    log_dir = st["storage_tiers_log_dir"]
    probe = f"{log_dir}/compliance-probe.log"
    script = (
        f"set -e; echo probe > {probe}; "
        f"sed 's#{log_dir}/\\*\\.log#{probe}#' /etc/logrotate.d/deepfleet > /tmp/df-logrotate-probe.conf; "
        "logrotate -f -s /tmp/df-logrotate-probe.state /tmp/df-logrotate-probe.conf; "
        f"ls {archive} | grep -c '^compliance-probe.log-'; "
        f"rm -f {archive}/compliance-probe.log-* {probe} /tmp/df-logrotate-probe.*"
    )
    out = host.run(script)
    assert out.rc == 0, out.stderr
    assert int(out.stdout.strip()) >= 1
