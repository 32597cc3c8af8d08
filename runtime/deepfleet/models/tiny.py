"""Small random-weight models in genuine Hugging Face format (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json). No model can be downloaded on the build machines, so tests and
the lab use these. Tensor names and shapes are written from the HF checkpoint layout, independently of
deepfleet's own model classes, so loading them also checks the loader's name mapping."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepfleet.quant.fp8 import SCALE_SUFFIX, quantize

ARCHS = ("qwen2", "llama", "deepseek_v3")

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]
THINK_TOKENS = ["<think>", "</think>"]  # added but not special: they stay visible in decoded text, like R1's

# DeepSeek-R1-style template: system text first, then User/Assistant turns; earlier answers lose their reasoning.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] %}{% endif %}"
    "{% endfor %}{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '" + USER + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '" + ASSISTANT + "' + c + '" + EOS + "' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "<think>\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model serves requests in batches; each request carries a prompt
and sampling parameters. Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 4096. GPUs, CPUs, memory and
bandwidth decide how fast tokens are generated. def main(): return {"ok": True, "value": [1, 2, 3]}
Deepfleet runs DeepSeek models on clusters, on bare metal and at the edge. Think step by step, then answer.
Bonjour, ça va? Grüße aus Köln — naïve café. 你好，世界。こんにちは。 Emoji: 🙂🚀.
"""

_BASE = {
    "vocab_size": 544,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "initializer_range": 0.02,
}

CONFIGS = {
    "qwen2": {
        **_BASE,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 2,
    },
    "llama": {
        **_BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        # the R1-Distill-Llama models use llama3 RoPE scaling; a small original context exercises it in tests
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "deepseek_v3": {
        **_BASE,
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "attention_bias": False,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
}


# DeepSeek-V3's published FP8 layout at tiny size: every dimension a multiple of the 128×128 scale block except
# kv_a_proj_with_mqa's rows (kv_lora + rope = 160: a partial last block, like V3's 576)
FP8_DEEPSEEK_V3 = {
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "moe_intermediate_size": 128,
}
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}


def _fp8_quantized(name: str) -> bool:
    """Which tensors DeepSeek's FP8 release stores in FP8: the attention and MLP/expert projections (not the
    router `mlp.gate`, the embeddings, lm_head, the norms, or the MTP layer's eh_proj)."""
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and not name.endswith("eh_proj.weight")


def _write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tokenizer(vocab_size: int):
    """Byte-level BPE trained on a small embedded corpus: any text round-trips through encode/decode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def _hf_tensor_shapes(cfg: dict, arch: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the HF checkpoint of `arch`."""
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)

    def mlp(prefix: str, inner: int) -> None:
        shapes[f"{prefix}.gate_proj.weight"] = (inner, h)
        shapes[f"{prefix}.up_proj.weight"] = (inner, h)
        shapes[f"{prefix}.down_proj.weight"] = (h, inner)

    def layer(i: int) -> None:
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        a = f"{p}.self_attn"
        if arch == "deepseek_v3":
            qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
            shapes[f"{a}.q_a_proj.weight"] = (cfg["q_lora_rank"], h)
            shapes[f"{a}.q_a_layernorm.weight"] = (cfg["q_lora_rank"],)
            shapes[f"{a}.q_b_proj.weight"] = (nh * qk, cfg["q_lora_rank"])
            shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h)
            shapes[f"{a}.kv_a_layernorm.weight"] = (cfg["kv_lora_rank"],)
            shapes[f"{a}.kv_b_proj.weight"] = (nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])
            shapes[f"{a}.o_proj.weight"] = (h, nh * cfg["v_head_dim"])
            if i < cfg["first_k_dense_replace"]:
                mlp(f"{p}.mlp", inter)
            else:
                e, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
                shapes[f"{p}.mlp.gate.weight"] = (e, h)
                shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (e,)
                for j in range(e):
                    mlp(f"{p}.mlp.experts.{j}", mi)
                mlp(f"{p}.mlp.shared_experts", mi * cfg["n_shared_experts"])
        else:
            hd = h // nh
            shapes[f"{a}.q_proj.weight"] = (nh * hd, h)
            shapes[f"{a}.k_proj.weight"] = (nkv * hd, h)
            shapes[f"{a}.v_proj.weight"] = (nkv * hd, h)
            shapes[f"{a}.o_proj.weight"] = (h, nh * hd)
            if arch == "qwen2":
                shapes[f"{a}.q_proj.bias"] = (nh * hd,)
                shapes[f"{a}.k_proj.bias"] = (nkv * hd,)
                shapes[f"{a}.v_proj.bias"] = (nkv * hd,)
            mlp(f"{p}.mlp", inter)

    for i in range(cfg["num_hidden_layers"]):
        layer(i)
    # DeepSeek-V3's multi-token-prediction layers follow the decoder layers (model.layers.61 in V3)
    for i in range(cfg["num_hidden_layers"], cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)):
        layer(i)
        p = f"model.layers.{i}"
        shapes.update({f"{p}.enorm.weight": (h,), f"{p}.hnorm.weight": (h,), f"{p}.eh_proj.weight": (h, 2 * h),
                       f"{p}.embed_tokens.weight": (v, h), f"{p}.shared_head.norm.weight": (h,),
                       f"{p}.shared_head.head.weight": (v, h)})
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    # std large enough that logits are spread out: greedy choices are then stable under float32 rounding
    return torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)


def write_tokenizer(out: Path, cfg: dict, vocab_size: int) -> tuple[int, int]:
    """The tiny byte-level tokenizer (`vocab_size` ids, at most cfg's), its tokenizer_config.json with the R1-style
    chat template and generation_config.json into `out`; returns (bos id, eos id)."""
    tok = build_tokenizer(min(cfg["vocab_size"], vocab_size))
    if tok.get_vocab_size() > cfg["vocab_size"]:
        raise ValueError(f"vocab_size: {cfg['vocab_size']} is smaller than the tokenizer's {tok.get_vocab_size()}")
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    gen_cfg = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return bos_id, eos_id


def make_tiny_model(out_dir: str | Path, arch: str, seed: int = 0, fp8: bool = False, shards: int = 1,
                    **overrides) -> Path:
    """Write a random-weight `arch` model to `out_dir`; `overrides` replace config.json fields. `fp8` (deepseek_v3):
    DeepSeek's published block-FP8 format (FP8 projections with `weight_scale_inv`, `quantization_config`) at the
    dimensions of FP8_DEEPSEEK_V3. `shards` > 1 splits the weights over files with a model.safetensors.index.json."""
    if arch not in CONFIGS:
        raise ValueError(f"arch: unknown {arch!r} (choose one of {', '.join(ARCHS)})")
    if fp8 and arch != "deepseek_v3":
        raise ValueError(f"fp8: the published block-FP8 format is DeepSeek-V3's, not {arch!r}'s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**CONFIGS[arch], **(FP8_DEEPSEEK_V3 if fp8 else {}), **overrides}
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    cfg.update(zip(("bos_token_id", "eos_token_id"), write_tokenizer(out, cfg, CONFIGS[arch]["vocab_size"]),
                   strict=True))
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: _random_tensor(n, s, gen).contiguous() for n, s in _hf_tensor_shapes(cfg, arch).items()}
    if fp8:
        block = tuple(FP8_QUANTIZATION_CONFIG["weight_block_size"])
        for name in [n for n in tensors if _fp8_quantized(n)]:
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize(tensors[name], block)
    _write_checkpoint(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
