"""Compliance suite: checks what the roles promise, on any inventory, through any testinfra backend.

    pytest tests/compliance --hosts=ansible://all --ansible-inventory=inventory/lab/hosts.yml
    pytest tests/compliance --hosts=ssh://dgx-01 --ansible-inventory=inventory/example/hosts.yml
    pytest tests/compliance --hosts=local:// [--ansible-inventory=FILE --inventory-host=NAME] [--require-gpu]

Expected values are the roles' own defaults, overridden by the inventory's variables of the same name, so
the suite checks the settings the playbooks applied to that inventory (one source of truth, no copies).
Without an inventory (local:// or ssh:// alone) the defaults are the expectation."""

from __future__ import annotations

import socket
from pathlib import Path

import jinja2
import pytest
import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"


_CACHE: dict[tuple[str, str], dict] = {}
_INVENTORY: dict[str, dict] = {}
_OPTIONS: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    _OPTIONS.update(inventory=config.getoption("ansible_inventory", None),
                    inventory_host=config.getoption("inventory_host", None),
                    require_gpu=config.getoption("require_gpu", False))


def _inventory_host_name(host) -> str:
    if _OPTIONS["inventory_host"]:
        return str(_OPTIONS["inventory_host"])
    spec = getattr(host.backend, "host", None)  # ssh://NAME and paramiko://NAME carry a host spec
    return spec.name if spec is not None else socket.gethostname()


def _read_inventory(path: str, name: str) -> dict:
    """The variables Ansible gives `name` in the inventory at `path` (host_vars, group_vars, groups)."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[path])
    found = inventory.get_host(name)
    if found is None:
        raise pytest.UsageError(f"--inventory-host {name!r} is not a host of {path} (pass --inventory-host NAME)")
    return VariableManager(loader=loader, inventory=inventory).get_vars(host=found)


def inventory_vars(host) -> dict:
    """This target's inventory variables: Ansible's own for ansible://, the --ansible-inventory file's for
    other backends, none (only group_names/groups, empty) when no inventory is given."""
    key = host.backend.get_pytest_id()
    if key not in _INVENTORY:
        if host.backend.get_connection_type() == "ansible":
            _INVENTORY[key] = host.ansible.get_variables()
        elif _OPTIONS.get("inventory"):
            _INVENTORY[key] = _read_inventory(str(_OPTIONS["inventory"]), _inventory_host_name(host))
        else:
            _INVENTORY[key] = {"group_names": [], "groups": {}}
    return _INVENTORY[key]


def role_vars(host, role: str) -> dict:
    key = (host.backend.get_pytest_id(), role)
    if key not in _CACHE:
        defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
        inventory = inventory_vars(host)
        _CACHE[key] = {**defaults, **{k: v for k, v in inventory.items() if k in defaults}}
    return _CACHE[key]


@pytest.fixture
def inventory(host) -> dict:
    """The target's inventory variables (see inventory_vars)."""
    return inventory_vars(host)


@pytest.fixture
def inventory_value(inventory):
    """inventory_value('ansible_host'): a value only the inventory can give; skips the check without it."""
    def value(name: str):
        if name not in inventory:
            pytest.skip(f"{name} comes from the inventory: run with --ansible-inventory (and --inventory-host)")
        return inventory[name]
    return value


@pytest.fixture
def common(host) -> dict:
    return role_vars(host, "common")


@pytest.fixture
def in_container(host) -> bool:
    return host.run("systemd-detect-virt --container").rc == 0


# ---- GPU-aware selection (nvidia_driver, cuda, nccl, container_runtime checks)
# GPU checks run where the host has an NVIDIA GPU; on a host without one they skip with the reason,
# unless the inventory declares it a GPU host (nvidia_driver_gpu_required) or pytest runs with --require-gpu,
# where a missing GPU fails.
GPU_SCAN = ROLES / "nvidia_driver" / "files" / "gpu-scan.sh"


@pytest.fixture
def gpu_device_ids(host) -> list[str]:
    """PCI device ids of the host's NVIDIA GPUs, found the way the nvidia_driver role finds them."""
    lines = host.check_output("bash -c %s", GPU_SCAN.read_text()).splitlines()
    return [line.split()[-1] for line in lines if line.strip()]


@pytest.fixture
def gpu_host(host, gpu_device_ids) -> int:
    """Number of GPUs; skips the test on a host without GPU that is not declared to have one."""
    if not gpu_device_ids:
        if _OPTIONS.get("require_gpu"):
            pytest.fail("--require-gpu is given but the host has no NVIDIA GPU on its PCI bus")
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
    context = {**yaml.safe_load(SHARED_VARS.read_text()), **inventory_vars(host), **settings}
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
