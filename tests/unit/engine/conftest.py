"""Engine test helpers: tiny random-weight models (written once per session) and a sampler wrapper that records
the logits each request was sampled from."""

import pytest
import torch

from deepfleet.engine.sampler import Sampler
from deepfleet.models.tiny import ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


class RecordingSampler(Sampler):
    """Records, per SamplingState, every logits row it sampled from (request order is kept by the caller)."""

    def __init__(self):
        self.rows: dict[int, list[torch.Tensor]] = {}

    def __call__(self, logits, seqs):
        for row, state in zip(logits, seqs, strict=True):
            self.rows.setdefault(id(state), []).append(row.detach().float().cpu().clone())
        return super().__call__(logits, seqs)


@pytest.fixture
def recording_sampler():
    return RecordingSampler
