"""What roles/nvidia_mig does on a GPU host with a declared nvidia_mig_layout: the layout is rendered for
nvidia-mig-parted, the GPUs are in it (nvidia-mig-parted assert), and the boot service that recreates the
instances after a reboot is enabled. Hosts without a layout keep MIG as it was: nothing to check."""

from __future__ import annotations

import pytest
import yaml


@pytest.fixture
def mig(role_settings) -> dict:
    settings = role_settings("nvidia_mig")
    if not settings["nvidia_mig_layout"]:
        pytest.skip("no nvidia_mig_layout declared for this host")
    return settings


def test_layout_rendered_for_mig_parted(host, mig, gpu_host):
    f = host.file(mig["nvidia_mig_config_file"])
    assert f.is_file and f.user == "root" and f.mode == 0o644
    config = yaml.safe_load(f.content_string)
    assert config["mig-configs"][mig["nvidia_mig_config_name"]] == mig["nvidia_mig_layout"]


def test_gpus_are_in_the_declared_layout(host, mig, gpu_host):
    out = host.run(f"nvidia-mig-parted assert -f {mig['nvidia_mig_config_file']} -c {mig['nvidia_mig_config_name']}")
    assert out.rc == 0, out.stdout + out.stderr


def test_boot_service_recreates_the_instances(host, mig, gpu_host):
    assert host.service("deepfleet-mig").is_enabled
