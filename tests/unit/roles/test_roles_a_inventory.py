"""inventory/example documents every variable of the GPU/fabric/storage/hardening roles, and its values pass
the roles' argument specs and declaration checks (what a real site would run into first)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "inventory" / "example"
ROLES = ("nvidia_driver", "cuda", "nccl", "rdma_roce", "storage_tiers", "container_runtime", "hardening")
# Where each role runs (playbooks/*.yml).
ROLE_GROUP = {"nvidia_driver": "gpu_nodes", "cuda": "gpu_nodes", "container_runtime": "gpu_nodes",
              "nccl": "gpu_nodes", "rdma_roce": "gpu_nodes", "storage_tiers": "all", "hardening": "all"}


def _plugin(role: str, module: str):
    path = REPO / "roles" / role / "filter_plugins" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"inv_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _specs(role: str) -> dict:
    return yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]


@pytest.fixture(scope="module")
def inventory() -> dict:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    ansible_inventory = Path(sys.executable).with_name("ansible-inventory")
    out = subprocess.run([str(ansible_inventory), "-i", str(EXAMPLE), "--list"], capture_output=True, text=True,
                         env=env, check=True, cwd=REPO)
    return json.loads(out.stdout)


def _hosts(inventory: dict, group: str) -> list[str]:
    if group == "all":
        return sorted(inventory["_meta"]["hostvars"])
    return inventory[group]["hosts"]


def test_every_role_variable_is_documented_in_the_example_inventory():
    text = "\n".join(p.read_text() for p in EXAMPLE.rglob("*.yml"))
    missing = [f"{role}: {name}" for role in ROLES for name in _specs(role)["main"]["options"]
               if not re.search(rf"\b{name}\b", text)]
    assert not missing, "undocumented in inventory/example: " + ", ".join(missing)


@pytest.mark.parametrize("role", ROLES)
def test_example_values_pass_the_argument_specs(inventory, role):
    options = _specs(role)["main"]["options"]
    defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())
    for host in _hosts(inventory, ROLE_GROUP[role]):
        hostvars = inventory["_meta"]["hostvars"][host]
        params = {k: v for k, v in {**defaults, **hostvars}.items() if k in options}
        # values still templated ("{{ ... }}") are resolved by Ansible at run time; check the literal ones
        params = {k: v for k, v in params.items() if not (isinstance(v, str) and "{{" in v)}
        spec = {k: {kk: vv for kk, vv in o.items() if kk in ("type", "choices", "elements", "options")}
                for k, o in options.items()}
        result = ArgumentSpecValidator(spec).validate(params)
        assert not result.error_messages, f"{host}: {result.error_messages}"


def test_example_networks_and_storage_declarations_are_valid(inventory):
    net = _plugin("hardening", "netcheck")
    storage = _plugin("storage_tiers", "storage")
    defaults = yaml.safe_load((REPO / "roles" / "storage_tiers" / "defaults" / "main.yml").read_text())
    for host, hv in inventory["_meta"]["hostvars"].items():
        for var in ("deepfleet_allowed_networks", "hardening_trusted_networks", "hardening_client_networks"):
            assert net.cidr_problems(hv.get(var, []), var) == [], host
        merged = {**defaults, **hv}
        tiers = storage.storage_tiers_list({t: {"devices": merged[f"storage_tiers_{t}_devices"],
                                                "mount": merged[f"storage_tiers_{t}_mount"]}
                                            for t in ("hot", "warm", "cold")})
        assert storage.storage_tiers_problems(tiers) == [], host
    gpu = inventory["_meta"]["hostvars"]["dgx-01"]
    assert len(gpu["storage_tiers_hot_devices"]) >= 2  # the example shows the RAID0 hot tier
