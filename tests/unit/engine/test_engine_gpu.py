"""GPU path against the CPU float32 reference on tiny models: same greedy tokens and logits within float32
rounding, with CUDA graphs on (Qwen2/Llama) and chunked prefill and batching in the mix. Runs only with a GPU."""

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _run(model_dir, device, recorder_cls, prompts, **kw):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device=device, **kw))
    engine.sampler = recorder_cls()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=32)
    states = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
        states[str(i)] = engine.requests[str(i)].sampling
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    tokens = [done[str(i)] for i in range(len(prompts))]
    logits = [torch.stack(engine.sampler.rows[id(states[str(i)])]) for i in range(len(prompts))]
    return tokens, logits, engine


@pytest.mark.parametrize("arch", ["qwen2", "llama", "deepseek_v3"])
def test_gpu_matches_cpu(tiny_models, recording_sampler, arch):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 530, (n,), generator=g).tolist() for n in (5, 37, 90, 130)]
    cpu_tokens, cpu_logits, _ = _run(tiny_models[arch], "cpu", recording_sampler, prompts)
    # max_num_seqs 8: graphs for batches 1, 2, 4, 8 (the default ladder of 83 graphs takes a minute per engine)
    gpu_tokens, gpu_logits, engine = _run(tiny_models[arch], "cuda", recording_sampler, prompts,
                                          max_num_batched_tokens=64, max_num_seqs=8)
    assert engine.runner.graphs, "decode steps should have replayed CUDA graphs"
    assert gpu_tokens == cpu_tokens
    for c, gl in zip(cpu_logits, gpu_logits, strict=True):
        assert (c - gl).abs().max() <= 1e-4 * c.abs().max()


def test_batch1_triton_gemv_matches_cpu(tiny_models, recording_sampler, monkeypatch):
    """One request (batch-1 decode graphs) with every projection shape forced onto the Triton GEMV at one split-K
    and one unsplit candidate tile, and the O and down projections onto the GEMV with the residual add + RMSNorm
    epilogue, whatever the start-up timing chose: same greedy tokens and logits as the CPU reference."""
    from deepfleet.engine import model_runner
    from deepfleet.kernels import gemv
    from deepfleet.kernels.gemv import CANDIDATE_TILES
    from deepfleet.models import layers

    choose = model_runner.choose_gemv
    split = next(t for t in CANDIDATE_TILES if t[3] > 1)
    forced = []

    def all_gemv(model, device, dtype):
        timings = choose(model, device, dtype)
        for m in model.modules():
            if isinstance(m, layers.Linear):
                m.gemv_tiles = split
                forced.append(m)
            if isinstance(m, layers.GatedMLP):
                m.gemv_silu_tiles = CANDIDATE_TILES[0]
                forced.append(m)
        # the O and down projections with the residual add + RMSNorm in their epilogue (the down projection's the
        # next layer's input norm, the last one's the final norm), split and unsplit on alternate layers
        for i, layer in enumerate(model.model.layers):
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.gemv_norm_tiles = split if i % 2 else CANDIDATE_TILES[0]
                forced.append(proj)
        fused_calls.clear()  # (the start-up timing's own calls)
        return timings

    monkeypatch.setattr(model_runner, "choose_gemv", all_gemv)
    fused_calls = []
    add_norm = gemv.gemv_add_norm

    def counted_add_norm(*args, **kw):  # (called at graph capture and in eager steps)
        fused_calls.append(args[1].shape)
        return add_norm(*args, **kw)

    monkeypatch.setattr(gemv, "gemv_add_norm", counted_add_norm)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 530, (40,), generator=g).tolist()]
    cpu_tokens, cpu_logits, _ = _run(tiny_models["qwen2"], "cpu", recording_sampler, prompts)
    gpu_tokens, gpu_logits, engine = _run(tiny_models["qwen2"], "cuda", recording_sampler, prompts, max_num_seqs=4)
    assert any(isinstance(m, layers.GatedMLP) for m in forced)
    # both projection shapes of both layers (at graph capture), the O and the down projection's
    assert len(set(fused_calls)) == 2 and len(fused_calls) >= 4, fused_calls
    assert gpu_tokens == cpu_tokens
    assert (cpu_logits[0] - gpu_logits[0]).abs().max() <= 1e-4 * cpu_logits[0].abs().max()


def test_batch1_fp8_gemv_matches_cpu(tmp_path, recording_sampler, monkeypatch):
    """A tiny Qwen2 quantized on load (engine.quantization = fp8), one request, every FP8 projection forced onto
    kernels/fp8_gemm.py's one-row GEMV (split K where K has two steps), gate_up onto it with SiLU·mul in its
    epilogue, the O and down projections with the residual add + RMSNorm (split and unsplit on alternate layers),
    in place of the start-up timing: the CPU reference's greedy tokens (its dequantized float32 products), logits
    within the tf32 rounding of the GPU prefill (the FP8 streaming kernel's float32 dot) and far inside what a wrong
    block scale, a lost split or residual would give."""
    from deepfleet.engine import model_runner
    from deepfleet.kernels import fp8_gemm
    from deepfleet.models.tiny import make_tiny_model
    from deepfleet.quant.linear import Fp8Linear

    split, unsplit = (16, 256, 4, 2), fp8_gemm.GEMV_CANDIDATES[0]  # (K 256 and 512: down's K split in two)
    forced = []

    def all_gemv(model, device, dtype):  # (no timing: its candidate compilations would take most of a minute)
        for m in model.modules():
            if isinstance(m, Fp8Linear):
                m.gemv_tiles = split
                forced.append(m)
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gemv_silu_tiles = unsplit
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.gemv_norm_tiles = split if i % 2 else unsplit
        return {}

    monkeypatch.setattr(model_runner, "choose_gemv", all_gemv)
    model_dir = make_tiny_model(tmp_path / "q", "qwen2", hidden_size=256, intermediate_size=512,
                                num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 530, (24,), generator=g).tolist()]
    cpu_tokens, cpu_logits, _ = _run(model_dir, "cpu", recording_sampler, prompts, quantization="fp8")
    gpu_tokens, gpu_logits, engine = _run(model_dir, "cuda", recording_sampler, prompts, max_num_seqs=4,
                                          quantization="fp8")
    assert forced and engine.runner.graphs
    assert gpu_tokens == cpu_tokens
    assert (cpu_logits[0] - gpu_logits[0]).abs().max() <= 2e-2 * cpu_logits[0].abs().max()


def test_batch1_moe_decode_matches_cpu_deepseek(tiny_models, recording_sampler, monkeypatch):
    """One request of the tiny DeepSeek-V3 (batch-1 decode graphs) with every MoE layer forced onto
    kernels/moe_decode.py (routed and shared experts in two launches, no sort by expert) at its first candidate,
    whatever the start-up timing chose: the CPU reference's greedy tokens and logits."""
    from deepfleet.engine import model_runner
    from deepfleet.kernels import moe_decode

    choose = model_runner.choose_gemv

    def forced(model, device, dtype):
        timings = choose(model, device, dtype)
        for m in model.modules():
            if hasattr(m, "one_row_candidates"):
                m.one_row_tiles = m.one_row_candidates()[0]
        calls.clear()  # (the start-up timing's own calls)
        return timings

    monkeypatch.setattr(model_runner, "choose_gemv", forced)
    calls = []
    real = moe_decode.moe_decode

    def counted(*args, **kw):  # (called at graph capture)
        calls.append(kw["tiles"] if "tiles" in kw else args[8])
        return real(*args, **kw)

    monkeypatch.setattr(moe_decode, "moe_decode", counted)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 530, (40,), generator=g).tolist()]
    cpu_tokens, cpu_logits, _ = _run(tiny_models["deepseek_v3"], "cpu", recording_sampler, prompts)
    gpu_tokens, gpu_logits, engine = _run(tiny_models["deepseek_v3"], "cuda", recording_sampler, prompts,
                                          max_num_seqs=4)
    assert calls and engine.runner.graphs
    assert gpu_tokens == cpu_tokens
    assert (cpu_logits[0] - gpu_logits[0]).abs().max() <= 1e-4 * cpu_logits[0].abs().max()
