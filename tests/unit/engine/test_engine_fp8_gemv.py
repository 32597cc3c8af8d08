"""The batch-1 FP8 decode through kernels/fp8_gemm.py's one-row GEMV epilogues (models/layers.py: GatedMLP.activate
and project_add_norm on an Fp8Linear): a tiny Qwen2 quantized on load decoding one request with every gate_up on
the GEMV with SiLU·mul in its epilogue and every O and down projection on the GEMV with the residual add + RMSNorm
(split and unsplit tiles on alternate layers) gives the same greedy tokens and logits as the unfused path (the
dequantized weights' products, then the activation and the norm). On CPU those GEMVs are normally never taken; here
they run under Triton's interpreter (tests/conftest.py) on CPU rows; compiled on CUDA it is test_engine_gpu's case."""

import os

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.kernels import fp8_gemm
from deepfleet.models import layers
from deepfleet.models.tiny import make_tiny_model

pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's CPU run"),
              pytest.mark.usefixtures("interpreter_scalar_index")]
QWEN2_FP8_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _decode(model_dir, recorder, fused: bool):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", quantization="fp8"))
    engine.sampler = recorder
    if fused:
        for i, layer in enumerate(engine.runner.model.model.layers):
            layer.mlp.gemv_silu_tiles = (32, 128, 4, 1)
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.gemv_norm_tiles = (16, 256, 4, 2) if i % 2 else (32, 128, 4, 1)
    engine.add_request("0", list(range(3, 20)), SamplingParams(temperature=0, ignore_eos=True, max_tokens=4))
    state = engine.requests["0"].sampling
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    return tokens, torch.stack(recorder.rows[id(state)])


def test_fp8_decode_through_the_gemv_epilogues_matches_unfused(tmp_path, recording_sampler, monkeypatch):
    model_dir = make_tiny_model(tmp_path / "q", "qwen2", **QWEN2_FP8_DIMS)
    ref_tokens, ref_logits = _decode(model_dir, recording_sampler(), fused=False)
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
    tokens, logits = _decode(model_dir, recording_sampler(), fused=True)
    # at least 3 decode steps x 2 layers (and the emulated graphs' capture passes); the prefill is not a GEMV
    assert sorted(set(calls)) == [("gemv_add_norm", (256, 256)), ("gemv_add_norm", (256, 512)),
                                  ("gemv_silu_mul", (1024, 256))]
    assert len(calls) >= 18
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
