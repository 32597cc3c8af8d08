"""Compliance suite: checks what the roles promise, on any inventory.

    pytest tests/compliance --hosts=ansible://all --ansible-inventory=inventory/lab/hosts.yml

Expected values are the roles' own defaults, overridden by the inventory's variables of the same name, so
the suite checks the settings the playbooks applied to that inventory (one source of truth, no copies)."""

from __future__ import annotations

from pathlib import Path

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
