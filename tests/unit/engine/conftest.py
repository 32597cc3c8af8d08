"""Engine test helpers: tiny random-weight models (written once per session) and a sampler wrapper that records
the logits each request was sampled from."""

import pytest
import torch

from deepfleet.engine.sampler import Sampler
from deepfleet.models.tiny import ARCHS, make_tiny_model

# Tiny matmuls: one thread avoids OpenMP spin-wait contention on the shared 2-core CI machine (15x faster here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


class RecordingSampler(Sampler):
    """Records, per SamplingState, every logits row it sampled from (request order is kept by the caller)."""

    def __init__(self):
        self.rows: dict[int, list[torch.Tensor]] = {}
        self._alive = []  # keeps recorded states alive so their id() is never reused

    def sample(self, logits, seqs, all_argmax=False):
        for row, state in zip(logits, seqs, strict=True):
            if id(state) not in self.rows:
                self._alive.append(state)
            self.rows.setdefault(id(state), []).append(row.detach().float().cpu().clone())
        return super().sample(logits, seqs, all_argmax)


@pytest.fixture
def recording_sampler():
    return RecordingSampler
