"""Loading Hugging Face model directories: sharded checkpoints, dtypes, and clear errors naming the file, field or
tensor for unknown architectures, missing tensors, shape mismatches and inconsistent shard indexes. Also the
tokenizer of the tiny models (round trip, special tokens, chat template) and the make-tiny-model CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from deepfleet.cli import app
from deepfleet.models.config import load_config
from deepfleet.models.loader import load_model
from deepfleet.models.tiny import make_tiny_model
from deepfleet.models.tokenizer import Tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2")


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _load(path, dtype=torch.float32):
    cfg = load_config(path)
    return load_model(cfg, dtype, torch.device("cpu"), cfg.max_position_embeddings)


def test_sharded_checkpoint_loads_the_same_weights(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_file({n: tensors[n] for n in part}, d / fname)
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = _load(qwen2_dir), _load(d)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parameters_are_created_in_the_target_dtype(qwen2_dir, dtype):
    model = _load(qwen2_dir, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_unknown_architecture_names_config_field(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: architectures=\['MambaForCausalLM'\]"):
        load_config(d)


def test_fp8_config_over_unquantized_weights_is_refused_not_misread(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: dtype torch\.float32"):
        _load(d)


def test_missing_tensor_is_reported(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*layers\.1\.self_attn\.qkv_proj\.weight\[shard 1\]"):
        _load(d)


def test_shape_mismatch_names_file_and_tensor(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight: shape"):
        _load(d)


def test_index_pointing_at_a_shard_without_the_tensor(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    names = list(load_file(d / "model.safetensors"))
    index = {"weight_map": {**dict.fromkeys(names, "model.safetensors"), "model.extra.weight": "model.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors: the index lists tensors the file lacks"):
        _load(d)


def test_corrupt_shard_is_reported(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read"):
        _load(d)


def test_tokenizer_round_trip_and_chat_template(qwen2_dir):
    tok = Tokenizer(qwen2_dir)
    text = "Hello world! Grüße, 你好 🙂 <think>reasoning</think> done"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.token_to_id("<｜end▁of▁sentence｜>") in tok.eos_token_ids
    assert tok.bos_token_id in tok.all_special_ids and tok.token_to_id("<think>") not in tok.all_special_ids
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "<think>x</think>Hello"},
                                      {"role": "user", "content": "Again"}])
    assert prompt == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>"
                      "<｜User｜>Again<｜Assistant｜><think>\n")


def test_make_tiny_model_cli(tmp_path):
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "ds"), "--arch", "deepseek_v3"])
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "ds").arch == "deepseek_v3"
    bad = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "x"), "--arch", "gpt2"])
    assert bad.exit_code == 2 and "arch" in bad.output


def test_checksum_mismatch_in_a_shard_is_caught_before_loading(qwen2_dir, tmp_path):
    from deepfleet.security.manifest import ManifestError, write_manifest

    d = _copy(qwen2_dir, tmp_path)
    write_manifest(d)
    _load(d)  # intact: loads
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one weight byte flipped
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.safetensors: sha256 mismatch"):
        _load(d)


_MEASURE = """
import sys, torch
from safetensors.torch import load_file
from deepfleet.models.config import load_config
from deepfleet.models.loader import load_model

def rss_anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))

path, naive = sys.argv[1], sys.argv[2] == "naive"
cfg = load_config(path)
before = rss_anon()
held = {k: v.clone() for k, v in load_file(path + "/model.safetensors").items()} if naive else None
model = load_model(cfg, torch.float32, torch.device("cpu"), 512)
print(rss_anon() - before)
"""


@pytest.mark.parametrize("mode", ["engine", "naive"])
def test_loading_needs_no_second_copy_of_the_weights(tmp_path, mode):
    """Anonymous memory grown by loading, in a fresh process: the parameters plus at most one tensor in flight.
    The "naive" run holds a full extra copy, checking that the measurement can see one."""
    d = make_tiny_model(tmp_path / "m", "qwen2", hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                        num_key_value_heads=4, num_hidden_layers=4)
    weight_bytes = (d / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(d), mode], capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[-1]) / weight_bytes
    if mode == "engine":
        assert grown < 1.3, grown
    else:
        assert grown > 1.8, grown
