"""Server test fixtures: one tiny model per session (`deepfleet make-tiny-model`'s function) and a shared real
server per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import LiveServer, live_server, settings_for

from deepfleet.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", arch="qwen2", seed=0)


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[LiveServer]:
    """The shared real server: real engine, real tiny model, room for the concurrency tests."""
    with live_server(settings_for(tiny_model, max_concurrent=64, max_queue=512)) as s:
        yield s
