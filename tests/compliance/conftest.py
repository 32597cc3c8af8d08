"""Compliance suite: checks what the roles promise, on any inventory.

    pytest tests/compliance --hosts=ansible://all --ansible-inventory=inventory/lab/hosts.yml

Expected values are the roles' own defaults, overridden by the inventory's variables of the same name, so
the suite checks the settings the playbooks applied to that inventory (one source of truth, no copies)."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"


_CACHE: dict[tuple[str, str], dict] = {}


def role_vars(host, role: str) -> dict:
    key = (host.backend.get_pytest_id(), role)
    if key not in _CACHE:
        defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
        inventory = host.ansible.get_variables()
        _CACHE[key] = {**defaults, **{k: v for k, v in inventory.items() if k in defaults}}
    return _CACHE[key]


@pytest.fixture
def common(host) -> dict:
    return role_vars(host, "common")


@pytest.fixture
def in_container(host) -> bool:
    return host.run("systemd-detect-virt --container").rc == 0


# ---- GPU-aware selection (nvidia_driver, cuda, nccl, container_runtime checks)
# GPU checks run where the host has an NVIDIA GPU; on a host without one they skip with the reason,
# unless the inventory declares it a GPU host (nvidia_driver_gpu_required), where a missing GPU fails.
GPU_SCAN = (
    "for d in /sys/bus/pci/devices/*; do [ \"$(cat $d/vendor)\" = 0x10de ] || continue; "
    "case \"$(cat $d/class)\" in 0x0300*|0x0302*) cat $d/device;; esac; done"
)


@pytest.fixture
def gpu_device_ids(host) -> list[str]:
    """PCI device ids of the host's NVIDIA GPUs, found the way the nvidia_driver role finds them."""
    return host.check_output(GPU_SCAN).split()


@pytest.fixture
def gpu_host(host, gpu_device_ids) -> int:
    """Number of GPUs; skips the test on a host without GPU that is not declared to have one."""
    if not gpu_device_ids:
        if role_vars(host, "nvidia_driver")["nvidia_driver_gpu_required"]:
            pytest.fail("nvidia_driver_gpu_required is true but the host has no NVIDIA GPU on its PCI bus")
        pytest.skip("no NVIDIA GPU on this host (GPU-only check)")
    return len(gpu_device_ids)


@pytest.fixture
def role_settings(host):
    """role_settings('nccl'): that role's defaults overridden by this host's inventory variables."""
    return lambda role: role_vars(host, role)

SHARED_VARS = Path(__file__).resolve().parents[2] / "playbooks" / "group_vars" / "all" / "deepfleet.yml"


def rendered(settings: dict, host) -> dict:
    """Role defaults may reference each other ("/models/{{ inference_runtime_model_name }}"): render them
    with the shared playbook variables and the host's inventory, as Ansible does."""
    context = {**yaml.safe_load(SHARED_VARS.read_text()), **host.ansible.get_variables(), **settings}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)

    def render(value):
        if not (isinstance(value, str) and "{{" in value):
            return value
        try:
            return env.from_string(value).render(context)
        except jinja2.TemplateError:  # controller-side paths (role_path | dirname): not checked on hosts
            return value

    for _ in range(5):  # nested references resolve in a few passes
        context = {k: render(v) for k, v in context.items()}
    return context


@pytest.fixture
def rendered_settings(host):
    """rendered_settings('loadbalancer'): role_settings with the Jinja references between defaults resolved."""
    return lambda role: rendered(role_vars(host, role), host)
