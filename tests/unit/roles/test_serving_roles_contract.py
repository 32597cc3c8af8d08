"""The inference_runtime, loadbalancer and monitoring roles: YAML copies of runtime settings equal the
runtime's values, every role default is declared in the role's argument spec, and bad input stops a play
before its first change with a message naming the variable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepfleet import defaults

REPO = Path(__file__).resolve().parents[3]
ROLES = ("inference_runtime", "loadbalancer", "monitoring", "model_store")
SHARED_VARS = REPO / "playbooks" / "group_vars" / "all" / "deepfleet.yml"


def test_api_port_copy_equals_runtime_default():
    assert yaml.safe_load(SHARED_VARS.read_text())["deepfleet_api_port"] == defaults.API_PORT


def test_prometheus_job_is_the_one_the_alerts_select():
    template = (REPO / "roles/monitoring/templates/prometheus.yml.j2").read_text()
    alerts = (REPO / "monitoring/rules/alerts.yml").read_text()
    assert "job_name: deepfleet\n" in template
    assert 'up{job="deepfleet"}' in alerts


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_in_the_argument_spec(role):
    role_dir = REPO / "roles" / role
    role_defaults = yaml.safe_load((role_dir / "defaults/main.yml").read_text())
    specs = yaml.safe_load((role_dir / "meta/argument_specs.yml").read_text())["argument_specs"]
    assert set(role_defaults) <= set(specs["main"]["options"]), role
    for entry in specs.values():
        for name, opt in entry["options"].items():
            # Defaults live once, in defaults/main.yml; the spec carries types and choices.
            assert "default" not in opt, f"{role}: {name} repeats its default in the argument spec"
            assert opt.get("description"), f"{role}: {name} has no description"


def run_role(tmp_path: Path, role: str, extra_vars: dict, tasks_from: str = "main") -> subprocess.CompletedProcess:
    """Apply a role to localhost in check mode; the failures tested here happen before any task changes."""
    play = [
        {
            "name": "bad input",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [{"ansible.builtin.include_role": {"name": role, "tasks_from": tasks_from}}],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(extra_vars))
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(REPO / "roles"), ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            "localhost,",
            "-c",
            "local",
            "--check",
            str(tmp_path / "play.yml"),
            "-e",
            f"@{tmp_path / 'vars.yml'}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )


SHARED = yaml.safe_load(SHARED_VARS.read_text())
STORE = {
    **SHARED,
    "inference_runtime_model_name": "m",
    "inference_runtime_group": "deepfleet",
    "inference_runtime_model_root": "/models/m",
    "model_store_remotes": {"origin": {"type": "s3"}},
    "model_store_origin": "origin:bucket/m",
    "model_store_revision": "r1",
}


@pytest.mark.parametrize(
    ("role", "tasks_from", "extra", "named"),
    [
        ("loadbalancer", "main", {**SHARED, "loadbalancer_balance": "random"}, "loadbalancer_balance"),
        ("loadbalancer", "main", {**SHARED, "loadbalancer_backend_group": "nosuchgroup"}, "loadbalancer_backend_group"),
        ("loadbalancer", "main", {k: v for k, v in SHARED.items() if k != "deepfleet_api_port"}, "deepfleet_api_port"),
        (
            "inference_runtime",
            "stage",
            {**SHARED, "inference_runtime_model_dir": "models/x"},
            "inference_runtime_model_dir",
        ),
        (
            "inference_runtime",
            "main",
            {**SHARED, "inference_runtime_model_source": "s3"},
            "inference_runtime_model_source",
        ),
        (
            "inference_runtime",
            "main",
            {**SHARED, "inference_runtime_memory_max": "lots"},
            "inference_runtime_memory_max",
        ),
        ("monitoring", "main", {**SHARED, "monitoring_node_exporter_port": "ninety"}, "monitoring_node_exporter_port"),
        ("model_store", "main", {**STORE, "model_store_origin": "elsewhere:bucket/m"}, "model_store_origin"),
        ("model_store", "main", {**STORE, "model_store_revision": "current"}, "model_store_revision"),
        ("model_store", "main", {**STORE, "model_store_revision": "../r1"}, "model_store_revision"),
        ("model_store", "main", {**STORE, "model_store_keep": 0}, "model_store_keep"),
        ("model_store", "main", {**STORE, "model_store_cache_host": "nohost"}, "model_store_cache_host"),
        ("monitoring", "main", {**SHARED, "monitoring_server_group": "nosuchgroup"}, "monitoring_server_group"),
    ],
)
def test_bad_input_fails_before_any_change(tmp_path, role, tasks_from, extra, named):
    res = run_role(tmp_path, role, extra, tasks_from)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert named in out, out
    assert "changed=0" in out, out


def test_runtime_runs_as_the_common_service_user():
    common = yaml.safe_load((REPO / "roles/common/defaults/main.yml").read_text())
    runtime = yaml.safe_load((REPO / "roles/inference_runtime/defaults/main.yml").read_text())
    assert runtime["inference_runtime_user"] == common["common_service_user"]
