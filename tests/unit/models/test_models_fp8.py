"""Loading block-FP8 checkpoints: bad input is refused with an error naming the tensor, field or device: scales
missing or misshapen, unsupported quant_method / fmt / activation scheme / block size, FP8 tensors without a
quantization_config or bf16 ones inside an FP8 checkpoint, a fused shard off the 128-row block grid, an unknown
engine.quantization, and FP8 on a GPU without FP8."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepfleet.models.config import load_config
from deepfleet.models.loader import load_model
from deepfleet.models.tiny import make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds_fp8(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "ds_fp8", "deepseek_v3", fp8=True, shards=2)


def _all_tensors(model_dir):
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_published_fp8_checkpoint_layout(ds_fp8):
    index = json.loads((ds_fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2
    t = _all_tensors(ds_fp8)
    assert t["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"].shape == (2, 1)
    assert t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)  # 160 rows: partial
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router stays unquantized


def _load(path, **kw):
    cfg = load_config(path)
    return load_model(cfg, torch.float32, torch.device("cpu"), 512, **kw)


def _rewrite(model_dir, edit):
    """Apply `edit(name -> tensor dict)` to the sharded checkpoint, keeping the index consistent."""
    tensors = _all_tensors(model_dir)
    edit(tensors)
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    (model_dir / "model.safetensors.index.json").unlink()
    save_file(tensors, model_dir / "model.safetensors")


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "model")


def test_missing_scale_is_named(ds_fp8, tmp_path):
    d = _copy(ds_fp8, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*layers\.2\.mlp\.experts\.w13_scale_inv\[shard \(5, 1\)\]"):
        _load(d)


def test_scale_of_wrong_shape_is_named(ds_fp8, tmp_path):
    d = _copy(ds_fp8, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    _rewrite(d, lambda t: t.__setitem__(name, torch.ones(1, 1)))
    with pytest.raises(ValueError, match=rf"tensor {name}: scale shape \(1, 1\) does not match the \(2, 1\) blocks"):
        _load(d)


def test_fp8_weight_without_quantization_config_is_refused(ds_fp8, tmp_path):
    d = _copy(ds_fp8, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.\d\..*: FP8 tensor for .* not quantized here"):
        _load(d)


def test_unquantized_weight_in_an_fp8_checkpoint_is_refused(ds_fp8, tmp_path):
    d = _copy(ds_fp8, tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(d, lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(ValueError, match=rf"tensor {name}: dtype torch\.float32 .* needs float8_e4m3fn"):
        _load(d)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("quant_method", "awq", r"quantization_config\.quant_method='awq' is not supported"),
    ("quant_method", "gptq", r"quantization_config\.quant_method='gptq' is not supported"),
    ("fmt", "e5m2", r"quantization_config\.fmt='e5m2' is not supported"),
    ("activation_scheme", "static", r"quantization_config\.activation_scheme='static' is not supported"),
    ("weight_block_size", None, r"quantization_config\.weight_block_size is missing"),
    ("weight_block_size", [128], r"quantization_config\.weight_block_size=\[128\] must be two positive"),
])
def test_unsupported_quantization_config_names_the_field(ds_fp8, tmp_path, field, value, message):
    d = _copy(ds_fp8, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    if value is None:
        del cfg["quantization_config"][field]
    else:
        cfg["quantization_config"][field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        load_config(d)


def test_fused_shard_off_the_block_grid_is_refused(tmp_path):
    # q is 4 heads x 48 = 192 rows: k starts at row 192, inside the second 128-row scale block
    d = make_tiny_model(tmp_path / "q", "qwen2", hidden_size=192, intermediate_size=256, num_attention_heads=4,
                        num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"k_proj\.weight: block size 128 does not divide the row offset 192"):
        _load(d, quantization="fp8")


def test_unknown_quantization_request_is_refused(tmp_path):
    d = make_tiny_model(tmp_path / "q", "qwen2")
    with pytest.raises(ValueError, match=r"quantization: 'int4' is not supported"):
        _load(d, quantization="int4")


def test_fp8_on_a_gpu_without_fp8_names_the_device(ds_fp8, monkeypatch):
    from deepfleet.quant import spec

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"device cuda:0 \(NVIDIA A100-SXM4-80GB, compute capability 8\.0\) "
                                         r"has no FP8 support"):
        spec.check_device(load_config(ds_fp8).quantization, torch.device("cuda:0"))


def test_make_tiny_model_cli_writes_the_fp8_format(tmp_path):
    from typer.testing import CliRunner

    from deepfleet.cli import app

    r = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "ds"), "--arch", "deepseek_v3", "--fp8",
                                 "--shards", "2"])
    assert r.exit_code == 0, r.output
    assert load_config(tmp_path / "ds").quantization.block == (128, 128)
    assert (tmp_path / "ds" / "model.safetensors.index.json").is_file()
    bad = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "q"), "--arch", "qwen2", "--fp8"])
    assert bad.exit_code == 2 and "fp8: the published block-FP8 format is DeepSeek-V3's" in bad.output
