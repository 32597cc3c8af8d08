"""deepfleet plan against figures worked out by hand from the published configs (not from the planner)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from deepfleet.cli import app
from deepfleet.engine.model_runner import ModelRunner
from deepfleet.models.config import load_config
from deepfleet.models.tiny import make_tiny_model
from deepfleet.plan.report import plan

GIB = 1 << 30


def test_7b_kv_bytes_and_parameters():
    m = plan("7b", gpus=["h200"], tp_sizes=[1])["model"]
    # 28 layers x (K + V) x 4 kv heads x 128 dims x 2 bytes
    assert m["kv_bytes_per_token"] == 28 * 2 * 4 * 128 * 2 == 57_344
    h, inter, vocab, kv = 3584, 18944, 152064, 4 * 128
    per_layer = (h * h + h) + 2 * (kv * h + kv) + h * h + 3 * h * inter + 2 * h  # q,k,v (+bias), o, mlp, 2 norms
    assert m["params"] == 28 * per_layer + 2 * vocab * h + h == 7_615_616_512
    assert m["weight_bytes"] >= 2 * m["params"]  # bf16, plus the rotary tables


def test_v3_mla_latent_and_size():
    m = plan("v3", dtype="bfloat16", gpus=["h200"], tp_sizes=[8])["model"]
    assert m["kv_layout"] == [1, 512 + 64, None]
    assert m["kv_bytes_per_token"] == 61 * (512 + 64) * 2 == 70_272
    assert 670e9 < m["params"] < 672e9  # DeepSeek-V3: 671B without the multi-token-prediction layer


def test_v3_fp8_fits_8xh200_not_8xh100():
    r = plan("deepseek-v3", gpus=["h200", "h100-80gb"], tp_sizes=[8], context=8192)
    assert r["model"]["weight_dtype"] == "fp8"  # from the config's quantization_config
    # ~669B quantized weights at 1 byte + a float32 scale per 128x128 tile, ~1.9B embedding/lm_head at 2 bytes
    assert 620 * GIB < r["model"]["weight_bytes"] < 635 * GIB
    by_gpu = {p["gpu"]: p for p in r["placements"]}
    assert by_gpu["h200"]["fits"] and by_gpu["h200"]["max_seqs"] >= 1
    assert not by_gpu["h100-80gb"]["fits"]
    assert "exceed 90% of 79.6 GiB" in by_gpu["h100-80gb"]["why"]  # 8 x 78.6 GiB of weights do not leave room


def test_payback_example_reproduced():
    c = plan("7b", gpus=["h200"], tp_sizes=[1])["cost"]
    assert c["cloud_monthly"] == 42_000 and c["onprem_capex"] == 280_000
    assert round(c["months"], 1) == 9.2
    c = plan("7b", gpus=["h200"], tp_sizes=[1], onprem_monthly=0)["cost"]
    assert round(c["months"], 2) == round(280_000 / 42_000, 2)


def test_power_counts_and_never_pays_back():
    c = plan("7b", gpus=["t4"], tp_sizes=[1], cloud_monthly=1000, onprem_capex=10_000, onprem_monthly=0,
             power_kw=2, power_price_per_kwh=1)["cost"]
    assert c["savings_monthly"] == 1000 - 2 * 730 and c["months"] is None


def test_max_seqs_arithmetic_h200():
    p = plan("7b", gpus=["h200"], tp_sizes=[1], context=4096)["placements"][0]
    assert p["kv_bytes_per_token_per_gpu"] == 57_344
    assert p["num_kv_blocks"] == p["kv_budget_per_gpu"] // (16 * 57_344)
    assert p["max_seqs"] == p["num_kv_blocks"] // (4096 // 16)
    # 143,771 MiB x 0.9 = 126.4 GiB, less 14.2 GiB of weights, 0.5 GiB CUDA context, 1 GiB reserve and ~0.8 GiB
    # for the profiled 4,096-token prefill (activations + its KV): ~109.8 GiB
    assert 109 * GIB < p["kv_budget_per_gpu"] < 111 * GIB


def test_gqa_heads_split_by_tp():
    p = plan("70b", gpus=["h100-80gb"], tp_sizes=[4])["placements"][0]
    assert p["kv_bytes_per_token_per_gpu"] == 80 * 2 * (8 // 4) * 128 * 2


def test_tiny_model_dir_matches_model_runner(tmp_path):
    model_dir = make_tiny_model(tmp_path / "tiny", "qwen2")
    m = plan(str(model_dir), dtype="bfloat16", gpus=["t4"], tp_sizes=[1])["model"]
    runner = ModelRunner(load_config(model_dir), torch.bfloat16, torch.device("cpu"), 64, 16, True)
    assert m["kv_bytes_per_token"] * 16 == runner.block_bytes()
    assert m["params"] == sum(p.numel() for p in runner.model.parameters())


def test_bare_config_missing_field_is_named(tmp_path):
    raw = json.loads((make_tiny_model(tmp_path / "t", "qwen2") / "config.json").read_text())
    del raw["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        plan(str(tmp_path / "config.json"))
    v3 = json.loads((make_tiny_model(tmp_path / "v", "deepseek_v3") / "config.json").read_text())
    del v3["kv_lora_rank"]
    (tmp_path / "v3.json").write_text(json.dumps(v3))
    with pytest.raises(ValueError, match="kv_lora_rank"):
        plan(str(tmp_path / "v3.json"))


def test_bad_input_named():
    with pytest.raises(ValueError, match="model: 'nope'"):
        plan("nope")
    with pytest.raises(ValueError, match="dtype: 'int3'"):
        plan("7b", dtype="int3")
    with pytest.raises(ValueError, match="gpu: 'v100'"):
        plan("7b", gpus=["v100"])
    with pytest.raises(ValueError, match="context"):
        plan("7b", context=0)


def test_cli_json_and_table():
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "7b", "--gpu", "h200", "--tp", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["model"]["kv_bytes_per_token"] == 57_344
    res = runner.invoke(app, ["plan", "v3", "--gpu", "h200", "--gpu", "h100-80gb", "--tp", "8"])
    assert res.exit_code == 0 and "payback 9.2 months" in res.output and "H200" in res.output
    res = runner.invoke(app, ["plan", "7b", "--tp", "3", "--gpu", "h200"])
    assert res.exit_code == 0 and "n/a" in res.output  # 28 heads do not split over 3
    res = runner.invoke(app, ["plan", "/nonexistent/config.json"])
    assert res.exit_code == 2 and "neither a preset" in res.output
