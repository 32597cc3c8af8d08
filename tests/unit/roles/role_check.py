"""Run a role's tasks or a playbook for real on this machine in Ansible's check mode, the way the role tests of GPU
roles do (no GPU here: the variables stand in for what the role would detect)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def check_role(tmp_path: Path, role: str, extra: dict, tasks_from: str = "main") -> tuple[int, str]:
    """(exit status, the play's output on one line) of `role`'s `tasks_from` against localhost with `extra`."""
    task = {"ansible.builtin.include_role": {"name": role, "tasks_from": tasks_from}}
    play = [{"name": role, "hosts": "localhost", "gather_facts": False, "tasks": [task]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(extra))
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(REPO / "roles"), ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "--check",
                          "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{tmp_path / 'vars.yml'}",
                          str(tmp_path / "play.yml")], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=180)
    return res.returncode, " ".join((res.stdout + res.stderr).split())


def check_playbook(tmp_path: Path, playbook: Path, groups: dict[str, dict[str, dict]], *args: str) -> tuple[int, str]:
    """(exit status, output) of `playbook` in check mode with the repo's ansible.cfg, against an inventory whose
    groups hold this machine under the given host names (local connection), each with its own host variables."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    children = {group: {"hosts": {name: {**local, **hostvars} for name, hostvars in hosts.items()}}
                for group, hosts in groups.items()}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": children}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(REPO / "roles"),
               ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), "--check", *args,
                          str(playbook)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    return res.returncode, res.stdout + res.stderr
