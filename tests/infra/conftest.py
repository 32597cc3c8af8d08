"""Session fixtures for the infra tests: each example stack runs once under Pulumi's mocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from infra_capture import STACKS, stack_capture

from infra.mocks import Capture

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # pulumi_aws warns about its own deprecated resource classes at import; we use none of them.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))


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
