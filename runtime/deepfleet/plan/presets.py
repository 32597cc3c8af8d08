"""The DeepSeek family as published: the architecture fields of each model's Hugging Face `config.json`
(deepseek-ai/DeepSeek-R1-Distill-*, deepseek-ai/DeepSeek-V3 and -R1, which share one config), written down so
`deepfleet plan` needs no download. Only what sizing reads is kept; token ids and tokenizer fields are left out."""

from __future__ import annotations

from typing import Any

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "max_position_embeddings": 131072,
          "torch_dtype": "bfloat16", "tie_word_embeddings": False, "use_sliding_window": False}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "max_position_embeddings": 131072,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}


def _qwen2(layers, hidden, heads, kv_heads, inter, vocab, rope_theta, eps) -> dict[str, Any]:
    return {**_QWEN2, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": inter, "vocab_size": vocab,
            "rope_theta": rope_theta, "rms_norm_eps": eps}


def _llama3(layers, hidden, heads, kv_heads, inter) -> dict[str, Any]:
    return {**_LLAMA3, "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": inter, "vocab_size": 128256}


_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_act": "silu", "torch_dtype": "bfloat16",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "vocab_size": 129280, "max_position_embeddings": 163840, "rope_theta": 10000, "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}

PRESETS: dict[str, dict[str, Any]] = {
    "r1-distill-qwen-1.5b": _qwen2(28, 1536, 12, 2, 8960, 151936, 10000.0, 1e-6),
    "r1-distill-qwen-7b": _qwen2(28, 3584, 28, 4, 18944, 152064, 10000.0, 1e-6),
    "r1-distill-llama-8b": _llama3(32, 4096, 32, 8, 14336),
    "r1-distill-qwen-14b": _qwen2(48, 5120, 40, 8, 13824, 152064, 1000000.0, 1e-5),
    "r1-distill-qwen-32b": _qwen2(64, 5120, 40, 8, 27648, 152064, 1000000.0, 1e-5),
    "r1-distill-llama-70b": _llama3(80, 8192, 64, 8, 28672),
    "deepseek-v3": _V3,
    "deepseek-r1": _V3,
}
# short names people type
ALIASES = {"1.5b": "r1-distill-qwen-1.5b", "7b": "r1-distill-qwen-7b", "8b": "r1-distill-llama-8b",
           "14b": "r1-distill-qwen-14b", "32b": "r1-distill-qwen-32b", "70b": "r1-distill-llama-70b",
           "v3": "deepseek-v3", "r1": "deepseek-r1", "671b": "deepseek-v3"}


def preset(name: str) -> dict[str, Any] | None:
    key = ALIASES.get(name.lower(), name.lower())
    return dict(PRESETS[key]) if key in PRESETS else None
