"""Guards for settings that must be typed in two places (a Prometheus rule file, a dict key, defaults the
compliance suite reads as written): each test fails when one copy drifts from the other."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import yaml
from role_check import check_playbook

from deepfleet.server.config import ServeSettings
from infra.config import Autoscaling

REPO = Path(__file__).resolve().parents[3]
ROLES = REPO / "roles"


def _defaults(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())


def _seconds(haproxy_time: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", haproxy_time)
    assert m, haproxy_time
    return int(m[1]) * {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600}[m[2]]


def test_haproxy_waits_longer_than_the_runtime_request_deadline():
    lb = _defaults("loadbalancer")
    deadline = ServeSettings.model_fields["request_timeout_s"].default
    assert lb["loadbalancer_runtime_request_timeout_s"] == deadline  # the role's copy of the runtime default
    for key in ("loadbalancer_timeout_server", "loadbalancer_timeout_client"):
        assert _seconds(lb[key]) > deadline, f"{key}={lb[key]} cuts requests the runtime still serves ({deadline} s)"


def _lb_play(tmp_path: Path, backends: dict, *extra: str) -> tuple[int, str]:
    play = [{"name": "lb", "hosts": "loadbalancers", "gather_facts": False,
             "tasks": [{"ansible.builtin.include_role": {"name": "loadbalancer"}}]}]
    (tmp_path / "lb.yml").write_text(yaml.safe_dump(play))
    if not (tmp_path / "group_vars").exists():  # the shared settings site.yml's plays get (API port, backend name)
        (tmp_path / "group_vars").mkdir()
        (tmp_path / "group_vars" / "all").symlink_to(REPO / "playbooks" / "group_vars" / "all")
    rc, out = check_playbook(tmp_path, tmp_path / "lb.yml", {"gpu_nodes": backends, "loadbalancers": {"lb-1": {}}},
                             *extra)
    return rc, " ".join(out.split())


def test_a_host_with_a_longer_request_deadline_than_haproxy_is_refused(tmp_path):
    slow = {"inference_runtime_config": {"request_timeout_s": 1200}}
    rc, out = _lb_play(tmp_path, {"gpu-a": {}, "gpu-b": slow})
    assert rc != 0
    assert ("gpu-b: inference_runtime_config.request_timeout_s=1200 s is not below "
            "loadbalancer_timeout_server=630s (630 s") in out, out
    assert "gpu-a: inference_runtime_config" not in out, out  # the default 600 s passes
    # raised on the load balancer too (20 minutes in HAProxy's format): the check passes for both hosts
    rc, out = _lb_play(tmp_path, {"gpu-a": {}, "gpu-b": slow}, "-e", "loadbalancer_timeout_server=21m")
    assert "is not below loadbalancer_timeout_server" not in out, out
    assert "ok: [lb-1] => (item=gpu-a)" in out and "ok: [lb-1] => (item=gpu-b)" in out, out


def test_queue_backlog_alert_threshold_is_the_autoscaling_target():
    target = Autoscaling().queue_length_target
    groups = yaml.safe_load((REPO / "monitoring/rules/alerts.yml").read_text())["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "DeepfleetQueueBacklog")
    assert re.fullmatch(r"deepseek_inference_queue_length > (\d+)", rule["expr"])[1] == str(target), rule["expr"]
    numbers = re.findall(r"\b\d+\b", rule["annotations"]["summary"] + " " + rule["annotations"]["description"])
    assert numbers == [str(target), str(target)], rule["annotations"]


def test_model_hot_tier_is_audited_and_holds_the_served_model():
    hot = _defaults("storage_tiers")["storage_tiers_hot_mount"]
    assert _defaults("hardening")["hardening_audit_watches"].get(hot) == "deepfleet-models", hot
    root = _defaults("inference_runtime")["inference_runtime_model_root"]
    assert root.startswith(hot + "/"), (root, hot)


def _blacklisted(package: str, prefixes: list[str]) -> bool:
    return any(package.startswith(p) for p in prefixes)


def test_unattended_upgrades_never_touch_a_package_the_driver_pin_holds():
    pref = (ROLES / "nvidia_driver/templates/nvidia-driver.pref.j2").read_text()
    globs = re.search(r"^Package: (.+)$", pref, re.M)[1].split()
    blacklist = _defaults("hardening")["hardening_unattended_blacklist"]
    # a glob is covered when its literal part (up to the first wildcard) starts with a blacklisted prefix
    uncovered = [g for g in globs if not _blacklisted(re.split(r"[*?\[]", g)[0], blacklist)]
    assert not uncovered, f"apt pin globs unattended-upgrades may still move: {uncovered}"


def test_unattended_upgrades_never_touch_a_gpu_package_the_roles_install():
    blacklist = _defaults("hardening")["hardening_unattended_blacklist"]
    by_source = yaml.safe_load((ROLES / "nvidia_driver/vars/main.yml").read_text())["nvidia_driver_packages_by_source"]
    cuda = _defaults("cuda")["cuda_matrix"]
    installed = [p for pkgs in by_source.values() for p in pkgs]
    installed += [c[k] for c in cuda.values() for k in ("toolkit", "runtime")]
    installed += [p for c in cuda.values() for p in c["cudnn"]]
    installed += [p for pkgs in _defaults("nccl")["nccl_packages_by_cuda"].values() for p in pkgs]
    installed.append("nvidia-container-toolkit")
    not_gpu = {"firmware-misc-nonfree"}  # Debian's general non-free firmware: security updates welcome
    names = [p.split("=")[0] for p in installed if p not in not_gpu]
    uncovered = [n for n in names if not _blacklisted(n, blacklist)]
    assert not uncovered, f"GPU packages unattended-upgrades may move: {uncovered}"
    # every pinned driver package of the Debian source also falls under the pin (the two lists agree)
    pin = re.search(r"^Package: (.+)$", (ROLES / "nvidia_driver/templates/nvidia-driver.pref.j2").read_text(), re.M)
    debian = [p for p in by_source["debian"] if p not in not_gpu]
    assert all(any(fnmatch.fnmatch(p, g) for g in pin[1].split()) for p in debian), debian
