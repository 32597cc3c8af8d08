"""config.json as current transformers writes it: transformers >= 5 moves `rope_theta` and `rope_scaling` into one
`rope_parameters` object (and `torch_dtype` to `dtype`), while the published R1 checkpoints keep the older keys.
Each tiny model's config is re-saved by transformers itself with a RoPE base far from the 10,000 default, and the
engine's greedy tokens must equal transformers' own on that directory. Then a whole model directory written by
transformers' save_pretrained (weights, config, tokenizer, chat_template.jinja) chats alike."""

import json
import shutil

import pytest
import torch

from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.llm import LLM
from deepfleet.models.config import load_config

transformers = pytest.importorskip("transformers")

ROPE_THETA = 1_000_000.0  # the R1-Distill-Qwen value; the default 10,000 would hide a base that was never read
PROMPT = [3, 17, 250, 9, 41, 77, 5, 120, 33, 8, 64, 2] * 16  # 192 tokens: past llama3/yarn's original context
NEW_TOKENS = 12


def _resaved(src, dst):
    shutil.copytree(src, dst)
    (dst / "config.json").unlink()
    cfg = transformers.AutoConfig.from_pretrained(src)
    cfg.rope_parameters["rope_theta"] = ROPE_THETA
    cfg.save_pretrained(dst)
    return json.loads((dst / "config.json").read_text())


@pytest.mark.parametrize("arch", ["qwen2", "llama", "deepseek_v3"])
def test_transformers5_config_matches_transformers(tiny_models, tmp_path, arch):
    written = _resaved(tiny_models[arch], tmp_path / arch)
    assert "rope_theta" not in written and "rope_scaling" not in written, written  # the layout under test
    assert written["rope_parameters"]["rope_theta"] == ROPE_THETA

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.float32).eval()
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))

    llm = LLM(str(tmp_path / arch), dtype="float32", device="cpu")
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, ignore_eos=True, max_tokens=NEW_TOKENS))
    assert out.outputs[0].token_ids == ids[len(PROMPT):]


def test_both_layouts_read_alike(tiny_models, tmp_path):
    legacy = load_config(tiny_models["llama"])
    _resaved(tiny_models["llama"], tmp_path / "llama")
    current = load_config(tmp_path / "llama")
    assert legacy.rope_theta == 10_000.0 and current.rope_theta == ROPE_THETA
    assert legacy.rope_scaling["rope_type"] == current.rope_scaling["rope_type"] == "llama3"
    assert current.rope_scaling["original_max_position_embeddings"] == 64
    assert load_config(tiny_models["qwen2"]).rope_scaling is None  # plain RoPE: no scaling either way


def test_per_layer_type_rope_parameters_are_refused(tiny_models, tmp_path):
    shutil.copytree(tiny_models["qwen2"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"m/config.json: rope_parameters=.* is not supported \(one set"):
        load_config(tmp_path / "m")


@pytest.mark.parametrize("arch", ["qwen2", "llama", "deepseek_v3"])
def test_directory_written_by_save_pretrained_serves_alike(tiny_models, tmp_path, arch):
    """Weights, config, tokenizer and chat template all as transformers' save_pretrained writes them today."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_models[arch])
    model.save_pretrained(tmp_path / arch)
    hf_tok.save_pretrained(tmp_path / arch)
    messages = [{"role": "user", "content": "hello there"}]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)[0, len(ids):].tolist()
    llm = LLM(str(tmp_path / arch), dtype="float32", device="cpu")
    assert llm.get_tokenizer().apply_chat_template(messages) == text
    (out,) = llm.chat(messages, SamplingParams(temperature=0, ignore_eos=True, max_tokens=NEW_TOKENS))
    assert out.outputs[0].token_ids == ref
