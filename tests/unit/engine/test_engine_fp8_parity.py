"""Block-FP8 models through the engine on CPU against Hugging Face transformers (float32) on the dequantized
weights, greedy tokens and first-step logits:
- a tiny DeepSeek-V3 checkpoint in the published format (sharded index, FP8 projections with `weight_scale_inv`
  per 128×128 block, `quantization_config`), loaded as FP8;
- a tiny Qwen2 and a tiny unquantized DeepSeek-V3 checkpoint quantized on load (engine.quantization = fp8).
The dequantized references are built here from the checkpoint files with this file's own arithmetic."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.models.tiny import FP8_DEEPSEEK_V3, make_tiny_model

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

NEW_TOKENS = 12
PROMPT_LENS = (6, 40)
QWEN2_FP8_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 530, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _all_tensors(model_dir):
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _dequantized_copy(src, dst):
    """An unquantized float32 copy: every FP8 weight times its 128×128 block's scale_inv, no quantization_config."""
    tensors = _all_tensors(src)
    plain = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            plain[name] = t.float()
            continue
        assert t.dtype == torch.float8_e4m3fn
        rows, cols = t.shape
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        plain[name] = t.float() * full
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(plain, dst / "model.safetensors")
    return dst


def _block_fake_quant(w):
    """Quantize-dequantize with one scale per 128×128 block: scale = block max |w| / 448, round to nearest e4m3."""
    rows, cols = w.shape
    out = torch.empty_like(w)
    for r in range(0, rows, 128):
        for c in range(0, cols, 128):
            blk = w[r : r + 128, c : c + 128]
            scale = blk.abs().max() / 448.0
            out[r : r + 128, c : c + 128] = (blk / scale).to(torch.float8_e4m3fn).float() * scale
    return out


def _hf_greedy(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    conts, logits0 = [], []
    with torch.no_grad():
        for prompt in _prompts():
            ids = list(prompt)
            for step in range(NEW_TOKENS):
                logits = model(torch.tensor([ids])).logits[0, -1]
                if step == 0:
                    logits0.append(logits)
                ids.append(int(logits.argmax()))
            conts.append(ids[len(prompt):])
    return conts, logits0


def _engine_greedy(model_dir, recorder_cls, **kw):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **kw))
    engine.sampler = recorder_cls()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=NEW_TOKENS)
    states = []
    for i, p in enumerate(_prompts()):
        engine.add_request(str(i), p, params)
        states.append(engine.requests[str(i)].sampling)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return [done[str(i)] for i in range(len(states))], [engine.sampler.rows[id(s)][0] for s in states], engine


@pytest.fixture(scope="module")
def ds_fp8(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "ds_fp8", "deepseek_v3", fp8=True, shards=2)


def _check(tokens, logits, ref):
    ref_tokens, ref_logits = ref
    assert tokens == ref_tokens
    for got, want in zip(logits, ref_logits, strict=True):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_deepseek_v3_fp8_matches_transformers_on_dequantized_weights(ds_fp8, tmp_path, recording_sampler):
    ref = _hf_greedy(_dequantized_copy(ds_fp8, tmp_path / "deq"))
    tokens, logits, engine = _engine_greedy(ds_fp8, recording_sampler)
    _check(tokens, logits, ref)
    model = engine.runner.model
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    # no compute-dtype copy of a quantized projection is kept (MLA's absorbed kv_b_proj is the documented one)
    unquantized = ("embed_tokens", "lm_head", "mlp.gate.", "_scale_inv")
    big_float = [n for n, p in model.named_parameters()
                 if p.dtype == torch.float32 and p.dim() >= 2 and not any(u in n for u in unquantized)]
    assert big_float == []


def _fake_quantized_copy(src, dst):
    """The checkpoint with every projection replaced by its 128×128 block-quantized-dequantized value."""
    tensors = load_file(src / "model.safetensors")
    fake = {n: _block_fake_quant(t) if n.endswith(("proj.weight", "proj_with_mqa.weight")) else t
            for n, t in tensors.items()}
    shutil.copytree(src, dst)
    save_file(fake, dst / "model.safetensors")
    return dst


def test_qwen2_quantized_on_load_matches_transformers(tmp_path, recording_sampler):
    src = make_tiny_model(tmp_path / "q", "qwen2", **QWEN2_FP8_DIMS)
    ref = _hf_greedy(_fake_quantized_copy(src, tmp_path / "ref"))
    tokens, logits, engine = _engine_greedy(src, recording_sampler, quantization="fp8")
    _check(tokens, logits, ref)
    assert engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert engine.runner.model.lm_head.weight.dtype == torch.float32


def test_deepseek_v3_bf16_checkpoint_quantized_on_load_matches_transformers(tmp_path, recording_sampler):
    # the same dimensions as the FP8 release, written unquantized (as DeepSeek's fp8_cast_bf16.py leaves it)
    src = make_tiny_model(tmp_path / "ds", "deepseek_v3", **FP8_DEEPSEEK_V3)
    ref = _hf_greedy(_fake_quantized_copy(src, tmp_path / "ref"))
    tokens, logits, engine = _engine_greedy(src, recording_sampler, quantization="fp8")
    _check(tokens, logits, ref)
    experts = engine.runner.model.model.layers[2].mlp.experts
    assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn


