"""Pulumi mock runs of the example stacks, once per test session (each run registers the whole program),
and the captured Kubernetes resources as manifests. A plain module (not conftest) so tests can import it."""

from __future__ import annotations

from infra.mocks import Capture, Recorded, run

STACKS = ("aws", "onprem", "hybrid")
_CACHE: dict[str, Capture] = {}


def stack_capture(stack: str) -> Capture:
    if stack not in _CACHE:
        _CACHE[stack] = run(stack)
    return _CACHE[stack]


def manifest(r: Recorded) -> dict:
    """A captured Kubernetes resource as the manifest the provider would apply."""
    m = dict(r.inputs)
    group_version = r.type.split(":")[1]
    m.setdefault("apiVersion", group_version.removeprefix("core/"))
    m.setdefault("kind", r.type.rsplit(":", 1)[1])
    return m


def k8s_manifests(capture: Capture) -> list[dict]:
    return [
        manifest(r)
        for r in capture.resources
        if r.custom and r.type.startswith("kubernetes:") and not r.type.startswith("kubernetes:helm.sh")
    ]
