"""What roles/inference_runtime does on the runtime hosts: the runtime installed from the wheelhouse into a
virtual environment, the model on the hot tier, the configuration, and a hardened, running, ready service."""

from __future__ import annotations

import json

import pytest
import yaml


@pytest.fixture
def rt(inventory, rendered_settings) -> dict:
    if "gpu_nodes" not in inventory["group_names"]:
        pytest.skip("not a runtime host (group gpu_nodes)")
    return rendered_settings("inference_runtime")


def unit_properties(host, *names: str) -> dict[str, str]:
    out = host.check_output("systemctl show deepfleet-runtime -p %s", ",".join(names))
    return dict(line.split("=", 1) for line in out.splitlines())


def test_runtime_installed_in_its_build_venv(host, rt):
    current = host.file(f"{rt['inference_runtime_home']}/current")
    assert current.is_symlink
    assert current.linked_to.startswith(f"{rt['inference_runtime_home']}/venvs/")
    version = host.check_output(f"{current.path}/bin/deepfleet --version")
    assert version.startswith("deepfleet ")
    # Installed from this build's wheels, copied from the controller (no registry on the host).
    build = current.linked_to.rsplit("/", 1)[1]
    wheels = host.check_output(f"ls {rt['inference_runtime_home']}/wheelhouse/{build}")
    assert "deepfleet_runtime-" in wheels and "torch-" in wheels


def test_model_on_the_hot_tier(host, rt):
    root = host.file(rt["inference_runtime_model_root"])  # the served model dir, or the folder of its revisions
    assert root.is_directory and root.user == "root" and root.group == rt["inference_runtime_group"]
    assert root.mode == 0o750
    if rt["inference_runtime_pkcs11"]:  # encrypted (test_key_store.py): only the ciphertext is on the host
        config = host.file(f"{rt['inference_runtime_model_dir']}/config.json.dfenc")
        assert config.is_file and config.mode == 0o640
        return
    config = host.file(f"{rt['inference_runtime_model_dir']}/config.json")
    assert config.is_file and config.mode == 0o640
    assert json.loads(config.content_string)["model_type"]


# written by tasks/security.yml and tasks/key_store.yml, checked in test_security.py and test_key_store.py
SECURITY_SECTIONS = ("auth", "tls", "audit", "weights")


def test_config_file_from_variables(host, rt):
    f = host.file(rt["inference_runtime_config_file"])
    assert f.is_file and f.user == "root" and f.group == rt["inference_runtime_group"] and f.mode == 0o640
    expected = dict(rt["inference_runtime_config"])
    if rt["inference_runtime_model_source"] == "objectstore":
        # the model path is <root>/current, a link named after the revision: the role names the model for clients
        expected.setdefault("served_model_name", rt["inference_runtime_model_name"])
    written = yaml.safe_load(f.content_string) or {}
    assert {k: v for k, v in written.items() if k not in SECURITY_SECTIONS} == expected


def test_service_hardened(host, rt):
    props = unit_properties(
        host,
        "User",
        "Group",
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "LimitNOFILE",
        "Restart",
        "CapabilityBoundingSet",
        "ReadOnlyPaths",
    )
    assert props["User"] == rt["inference_runtime_user"]
    assert props["Group"] == rt["inference_runtime_group"]
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["PrivateTmp"] == "yes"
    assert props["LimitNOFILE"] == str(rt["inference_runtime_limit_nofile"])
    assert props["Restart"] == "on-failure"
    assert props["CapabilityBoundingSet"] == ""
    assert rt["inference_runtime_model_root"] in props["ReadOnlyPaths"]


def test_service_enabled_running_as_service_user(host, rt):
    service = host.service("deepfleet-runtime")
    assert service.is_enabled and service.is_running
    pid = unit_properties(host, "MainPID")["MainPID"]
    assert host.check_output("ps -o user= -p %s", pid) == rt["inference_runtime_user"]


def test_service_cannot_write_the_system(host, rt):
    # ProtectSystem=strict seen from inside the service's mount namespace.
    pid = unit_properties(host, "MainPID")["MainPID"]
    mounts = [line.split() for line in host.check_output("cat /proc/%s/mountinfo", pid).splitlines()]
    for path in ("/", "/usr", "/etc"):
        # the innermost mount covering `path` decides
        covering = [m for m in mounts if path == m[4] or path.startswith(m[4].rstrip("/") + "/")]
        innermost = max(covering, key=lambda m: len(m[4]))
        assert "ro" in innermost[5].split(","), (path, innermost)


def api(rt, path: str) -> str:
    """curl arguments reaching the runtime on this host over http, or https verified with the deepfleet CA."""
    if rt["deepfleet_tls"]:
        return f"--cacert {rt['deepfleet_ca_file']} https://127.0.0.1:{rt['deepfleet_api_port']}{path}"
    return f"http://127.0.0.1:{rt['deepfleet_api_port']}{path}"


def test_ready_and_serving_metrics(host, rt):
    assert host.run(f"curl -fsS -o /dev/null {api(rt, '/readyz')}").rc == 0
    metrics = host.check_output(f"curl -fsS {api(rt, '/metrics')}")
    assert "deepseek_inference_latency_seconds_bucket" in metrics or "deepseek_inference_requests" in metrics
