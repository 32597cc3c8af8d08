"""The batch-1 GEMV epilogues wired into the decoder (models/layers.py GatedMLP.activate and project_add_norm,
models/base.py's layers ending in the next layer's input norm): a tiny Qwen2 decoding one request with every O and
down projection on the GEMV with the residual add + RMSNorm in its epilogue (kernels/gemv.py gemv_add_norm; split
and unsplit tiles on alternate layers) gives the same greedy tokens and logits as the unfused path; the same for a
tiny Qwen2 quantized to FP8 on load through kernels/fp8_gemm.py's one-row GEMV, gate_up with SiLU·mul in its
epilogue too (against the dequantized weights' products, then the activation and the norm). On CPU those GEMVs are
normally never taken; here they run under Triton's interpreter (tests/conftest.py) on CPU rows; compiled on CUDA it
is test_engine_gpu's case."""

import os

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.kernels import fp8_gemm, gemv
from deepfleet.models import layers
from deepfleet.models.tiny import make_tiny_model

pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's CPU run"),
              pytest.mark.usefixtures("interpreter_scalar_index")]
QWEN2_FP8_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _decode(model_dir, recorder, quantization=None, fuse=None):
    """Greedy tokens and logits of one request; `fuse(i, layer)` sets layer i's epilogue tiles (None: unfused)."""
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", quantization=quantization))
    engine.sampler = recorder
    for i, layer in enumerate(engine.runner.model.model.layers if fuse else []):
        fuse(i, layer)
    engine.add_request("0", list(range(3, 20)), SamplingParams(temperature=0, ignore_eos=True, max_tokens=4))
    state = engine.requests["0"].sampling
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    return tokens, torch.stack(recorder.rows[id(state)])


def _add_norm_tiles(split, unsplit):
    def fuse(i, layer):
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.gemv_norm_tiles = split if i % 2 else unsplit

    return fuse


def _fp8_epilogues(i, layer):
    layer.mlp.gemv_silu_tiles = (32, 128, 4, 1)
    _add_norm_tiles((16, 256, 4, 2), (32, 128, 4, 1))(i, layer)


def test_fused_add_norm_decode_matches_unfused(tiny_models, recording_sampler, monkeypatch):
    ref_tokens, ref_logits = _decode(tiny_models["qwen2"], recording_sampler())
    monkeypatch.setattr(layers, "_one_row", lambda x: x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1)
    calls = []
    add_norm = gemv.gemv_add_norm

    def counted(*args, **kw):
        calls.append(tuple(args[1].shape))
        return add_norm(*args, **kw)

    monkeypatch.setattr(gemv, "gemv_add_norm", counted)
    fuse = _add_norm_tiles((4, 16, 1, 2), (8, 32, 2, 1))
    tokens, logits = _decode(tiny_models["qwen2"], recording_sampler(), None, fuse)
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


def test_fp8_decode_through_the_gemv_epilogues_matches_unfused(tmp_path, recording_sampler, monkeypatch):
    model_dir = make_tiny_model(tmp_path / "q", "qwen2", **QWEN2_FP8_DIMS)
    ref_tokens, ref_logits = _decode(model_dir, recording_sampler(), "fp8")
    monkeypatch.setattr(layers, "_one_row", lambda x: x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1)
    calls = []

    def counted(name):
        real = getattr(fp8_gemm, name)

        def call(*args, **kw):
            calls.append((name, tuple(args[1].shape)))
            return real(*args, **kw)

        return call

    for name in ("gemv_silu_mul", "gemv_add_norm"):
        monkeypatch.setattr(fp8_gemm, name, counted(name))
    tokens, logits = _decode(model_dir, recording_sampler(), "fp8", _fp8_epilogues)
    # at least 3 decode steps x 2 layers (and the emulated graphs' capture passes); the prefill is not a GEMV
    assert sorted(set(calls)) == [("gemv_add_norm", (256, 256)), ("gemv_add_norm", (256, 512)),
                                  ("gemv_silu_mul", (1024, 256))]
    assert len(calls) >= 18
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
