"""Shared fixtures of the batching tests: the example ONNX models are exported once per session, and
small fake backends stand in where a test is about the batcher's timing rather than the numbers."""

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deepfleet.batching.examples import classifier_config, embedder_config, write_example_repository
from deepfleet.batching.repository import write_config


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture
def make_repo(example_repo, tmp_path):
    """A repository with the example models re-configured with `settings` (e.g. max_batch_size=1)."""

    def make(name: str = "repo", **settings) -> Path:
        root = tmp_path / name
        for config in (classifier_config(**settings), embedder_config(**settings)):
            write_config(root / config.name, config)
            shutil.copy(example_repo / config.name / config.file_name, root / config.name / config.file_name)
        return root

    return make


class FakeClassifier:
    """Stands in for the classifier: logits = first 4 features × 2; records each batch's row count."""

    def __init__(self, seconds: float = 0.0, fail_value: float | None = None):
        self.seconds = seconds
        self.fail_value = fail_value
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.closed = False

    def run(self, inputs):
        x = inputs["x"]
        with self.lock:
            self.batches.append(x.shape[0])
        if self.seconds:
            time.sleep(self.seconds)
        if self.fail_value is not None and (x == self.fail_value).any():
            raise ValueError("poisoned row")
        return {"logits": (x[:, :4] * 2).astype(np.float32)}

    def close(self):
        self.closed = True


@pytest.fixture
def fake_classifier():
    return FakeClassifier
