"""CLI habits of users coming from vLLM: `python -m deepfleet`, and vLLM's `serve` flag names with their meaning."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from deepfleet.cli import app


def test_python_dash_m_deepfleet_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "deepfleet", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("deepfleet "), r.stderr


def test_vllm_flag_names_map_to_the_same_settings(tmp_path):
    r = CliRunner().invoke(app, [
        "serve", str(tmp_path), "--print-config", "--served-model-name", "r1", "--dtype", "bfloat16",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.85", "--max-num-seqs", "48",
        "--max-num-batched-tokens", "2048", "--block-size", "32", "--no-enable-prefix-caching", "--enforce-eager",
        "--device", "cpu", "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--generation-config", "vllm",
        "--set", "engine.num_kv_blocks=99"])
    assert r.exit_code == 0, r.output
    settings = json.loads(r.output)
    assert settings["served_model_name"] == "r1" and settings["generation_config"] == "vllm"
    given = {k: v for k, v in settings["engine"].items() if v is not None}  # other fields stay unset
    assert given == {"dtype": "bfloat16", "device": "cpu", "max_num_seqs": 48,
                                  "max_num_batched_tokens": 2048, "block_size": 32, "num_kv_blocks": 99,
                                  "gpu_memory_utilization": 0.85, "enable_prefix_caching": False,
                                  "max_model_len": 4096, "enforce_eager": True, "quantization": "fp8",
                                  "kv_cache_dtype": "fp8"}


def test_flags_left_out_leave_the_engine_defaults(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--print-config"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output)["engine"].values()) == {None}


def test_bad_flag_value_names_the_setting(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--print-config", "--gpu-memory-utilization", "1.5"])
    assert r.exit_code == 2 and "engine.gpu_memory_utilization" in r.output


def test_lora_flags_as_vllm(tmp_path):
    r = CliRunner().invoke(app, [
        "serve", str(tmp_path), "--print-config", "--lora-modules", "sql=/adapters/sql",
        "--lora-modules", '{"name": "chat", "path": "/adapters/chat"}', "--max-loras", "3", "--max-lora-rank", "64"])
    assert r.exit_code == 0, r.output
    engine = json.loads(r.output)["engine"]
    assert engine["lora_modules"] == {"sql": "/adapters/sql", "chat": "/adapters/chat"}
    assert (engine["max_loras"], engine["max_lora_rank"], engine["enable_lora"]) == (3, 64, None)
    for bad, why in (("sql", "expected NAME=PATH"), ('{"name": "x"}', "expected {"), ("=p", "expected NAME=PATH")):
        r = CliRunner().invoke(app, ["serve", str(tmp_path), "--print-config", "--lora-modules", bad])
        assert r.exit_code == 2 and why in r.output, r.output
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--print-config", "--max-loras", "0"])
    assert r.exit_code == 2 and "engine.max_loras" in r.output


def test_vllm_tls_load_format_and_reasoning_flags(tmp_path):
    r = CliRunner().invoke(app, [
        "serve", str(tmp_path), "--print-config", "--ssl-certfile", "/etc/df/server.pem", "--ssl-keyfile",
        "/etc/df/server.key", "--ssl-ca-certs", "/etc/df/clients.pem", "--load-format", "dummy",
        "--reasoning-parser", "none"])
    assert r.exit_code == 0, r.output
    settings = json.loads(r.output)
    assert settings["tls"] == {"cert_file": "/etc/df/server.pem", "key_file": "/etc/df/server.key",
                               "client_ca_file": "/etc/df/clients.pem"}
    assert settings["engine"]["load_format"] == "dummy" and settings["reasoning_parser"] == "none"
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--print-config", "--reasoning-parser", "qwen3"])
    assert r.exit_code == 2 and "reasoning_parser" in r.output, r.output
