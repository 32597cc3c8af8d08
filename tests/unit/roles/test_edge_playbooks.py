"""The edge (Jetson) group in the playbooks and the example inventory: playbooks/runtime.yml serves the small
model there, playbooks/gpu.yml leaves the GPU stack to JetPack (with a message), the nvidia_driver and cuda
roles refuse edge hosts before any change, and inventory/example/group_vars/edge.yml is what infra renders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from role_check import check_playbook

from infra import onprem
from infra.config import parse, read_stack_file

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "inventory" / "example"
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def _plays(inventory: Path, playbook: str) -> dict[str, list[str]]:
    """play name -> the hosts it runs on (`ansible-playbook --list-hosts`, nothing is contacted)."""
    out = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "--list-hosts", f"playbooks/{playbook}"],
        capture_output=True, text=True, env=_env(), cwd=REPO, check=True, timeout=120,
    ).stdout
    plays: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if m := re.match(r"\s+play #\d+ \([^)]*\): (.+?)\tTAGS", line):
            current = plays.setdefault(m[1], [])
        elif current is not None and re.match(r"\s{6}\S+$", line):
            current.append(line.strip())
    return {name: sorted(hosts) for name, hosts in plays.items()}


def test_site_runs_the_runtime_on_the_edge_and_leaves_its_gpu_stack_to_jetpack():
    plays = _plays(EXAMPLE, "site.yml")
    assert plays["GPU driver, CUDA and container runtime"] == ["dgx-01", "dgx-02"]
    assert plays["Edge devices keep the GPU stack of their JetPack"] == ["jetson-01"]
    assert plays["Stage the deepfleet runtime (all hosts at once, no restart)"] == ["dgx-01", "dgx-02", "jetson-01"]
    assert plays["Switch the deepfleet runtime (rolling, one host at a time)"] == ["dgx-01", "dgx-02", "jetson-01"]


def test_a_jetson_listed_as_gpu_node_too_gets_no_desktop_driver(tmp_path):
    inventory = {"all": {"children": {"gpu_nodes": {"hosts": {"dgx-01": {}, "jetson-01": {}}},
                                      "edge": {"hosts": {"jetson-01": {}}}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    plays = _plays(tmp_path / "hosts.yml", "gpu.yml")
    assert plays["GPU driver, CUDA and container runtime"] == ["dgx-01"]
    assert plays["Edge devices keep the GPU stack of their JetPack"] == ["jetson-01"]


def test_gpu_playbook_says_why_the_edge_is_skipped():
    plays = yaml.safe_load((REPO / "playbooks/gpu.yml").read_text())
    edge = next(p for p in plays if p["hosts"] == "edge")
    assert not edge.get("roles")
    msg = edge["tasks"][0]["ansible.builtin.debug"]["msg"]
    assert "JetPack" in msg and "nvidia_driver" in msg and "cuda" in msg


@pytest.mark.parametrize("role", ["nvidia_driver", "cuda"])
def test_gpu_roles_refuse_an_edge_host_before_any_change(tmp_path, role):
    play = [{"name": "edge", "hosts": "all", "gather_facts": False,
             "tasks": [{"ansible.builtin.include_role": {"name": role}}]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    # cuda's defaults follow nvidia_driver_branch, which gpu.yml's nvidia_driver role brings into the play.
    rc, out = check_playbook(tmp_path, tmp_path / "play.yml", {"edge": {"localhost": {}}},
                             "-e", "nvidia_driver_branch=535")
    assert rc != 0, out
    assert f"localhost is in the edge group (Jetson): JetPack ships its driver and CUDA, the {role}" in out
    assert re.search(r"localhost\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=1", out), out


def _rendered_edge_vars() -> dict:
    files = onprem.render_inventory(parse(read_stack_file("onprem")))
    return yaml.safe_load(files[f"group_vars/{onprem.EDGE_GROUP}.yml"])


def test_example_edge_vars_are_what_pulumi_renders():
    # Settings live once (infra/runtime_settings.py, the stack's model): the example is a documented copy.
    example = yaml.safe_load((EXAMPLE / "group_vars" / f"{onprem.EDGE_GROUP}.yml").read_text())
    assert example == _rendered_edge_vars()
    hosts = yaml.safe_load((EXAMPLE / "hosts.yml").read_text())["all"]["children"]
    assert hosts[onprem.EDGE_GROUP]["hosts"], "inventory/example declares no edge device"
    assert set(hosts[onprem.EDGE_GROUP]["hosts"]).isdisjoint(hosts[onprem.GPU_GROUP]["hosts"])


def test_edge_vars_pass_the_runtime_role_argument_spec():
    specs = yaml.safe_load((REPO / "roles/inference_runtime/meta/argument_specs.yml").read_text())["argument_specs"]
    options = specs["main"]["options"]
    params = _rendered_edge_vars()
    params.pop("storage_tiers_hot_mount")
    assert set(params) <= set(options)
    spec = {k: {kk: vv for kk, vv in o.items() if kk in ("type", "choices", "elements", "options")}
            for k, o in options.items()}
    result = ArgumentSpecValidator(spec).validate(params)
    assert not result.error_messages, result.error_messages
