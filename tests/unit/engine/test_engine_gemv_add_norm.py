"""The decoder wiring of the GEMV with the residual add + RMSNorm in its epilogue (models/layers.py
project_add_norm, models/base.py's layers ending in the next layer's input norm): a tiny Qwen2 decoding one request
with every O and down projection on kernels/gemv.py gemv_add_norm (split and unsplit tiles on alternate layers)
gives the same greedy tokens and logits as the unfused path. On CPU the batch-1 GEMV is normally never taken; here
it runs under Triton's interpreter (tests/conftest.py) on CPU rows; compiled on CUDA it is test_engine_gpu's case."""

import os

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.kernels import gemv
from deepfleet.models import layers

pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's CPU run"),
              pytest.mark.usefixtures("interpreter_scalar_index")]


def _decode(model_dir, recorder, fused: bool):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu"))
    engine.sampler = recorder
    if fused:
        for i, layer in enumerate(engine.runner.model.model.layers):
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.gemv_norm_tiles = (4, 16, 1, 2) if i % 2 else (8, 32, 2, 1)
    engine.add_request("0", list(range(3, 20)), SamplingParams(temperature=0, ignore_eos=True, max_tokens=4))
    state = engine.requests["0"].sampling
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    return tokens, torch.stack(recorder.rows[id(state)])


def test_fused_add_norm_decode_matches_unfused(tiny_models, recording_sampler, monkeypatch):
    ref_tokens, ref_logits = _decode(tiny_models["qwen2"], recording_sampler(), fused=False)
    monkeypatch.setattr(layers, "_one_row", lambda x: x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1)
    calls = []
    add_norm = gemv.gemv_add_norm

    def counted(*args, **kw):
        calls.append(tuple(args[1].shape))
        return add_norm(*args, **kw)

    monkeypatch.setattr(gemv, "gemv_add_norm", counted)
    tokens, logits = _decode(tiny_models["qwen2"], recording_sampler(), fused=True)
    # at least 3 decode steps x 2 layers x (O, down) (and the emulated graphs' capture passes); the prefill
    # (17 rows) is not a GEMV
    assert sorted(set(calls)) == [(64, 64), (64, 128)] and len(calls) >= 12
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()


def test_start_up_refuses_a_fused_add_norm_that_disagrees(monkeypatch):
    """choose_gemv trusts the fused epilogue only where it reproduces the projection then the norm: the real kernel
    passes; one that loses a row block's residual (what a stale read in the last block's reduction gives) fails."""
    g = torch.Generator().manual_seed(0)
    proj, norm = layers.Linear(96, 64), layers.RMSNorm(64, 1e-6)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(64, 96, generator=g) / 10)
        norm.weight.copy_(1 + torch.rand(64, generator=g))
    x, residual = torch.randn(1, 96, generator=g), torch.randn(1, 64, generator=g)
    assert layers.add_norm_agrees(proj, norm, x, residual, (8, 32, 2, 2))

    real = gemv.gemv_add_norm

    def lossy(x, w, bias, residual, *rest):
        stale = residual.clone()
        stale[:, :8] = 0  # the first row block's residual never seen
        return real(x, w, bias, stale, *rest)

    monkeypatch.setattr(gemv, "gemv_add_norm", lossy)
    assert not layers.add_norm_agrees(proj, norm, x, residual, (8, 32, 2, 2))
