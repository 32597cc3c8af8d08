"""Pulumi mock runs of the example stacks, once per test session (each run registers the whole program)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.mocks import Capture, Recorded, run

STACKS = ("aws", "onprem", "hybrid")
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # pulumi_aws warns about its own deprecated resource classes at import; we use none of them.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))


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


@pytest.fixture(scope="session", params=STACKS)
def any_stack(request) -> Capture:
    return stack_capture(request.param)


@pytest.fixture(scope="session")
def aws_stack() -> Capture:
    return stack_capture("aws")


@pytest.fixture(scope="session")
def onprem_stack() -> Capture:
    return stack_capture("onprem")


@pytest.fixture(scope="session")
def hybrid_stack() -> Capture:
    return stack_capture("hybrid")
