"""engine.speculative as a server setting and flags, and its vLLM counters on /metrics."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from typer.testing import CliRunner

from deepfleet.cli import app
from deepfleet.engine.spec_decode.metrics import SpecDecodeStats
from deepfleet.server.config import SettingsError, load_settings
from deepfleet.server.metrics import LoadSnapshot, ServerMetrics


def test_flags_reach_the_engine_setting(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--speculative-method", "mtp", "--num-speculative-tokens",
                                 "1", "--print-config"])
    assert r.exit_code == 0, r.output
    assert '"speculative": {\n      "method": "mtp",\n      "num_speculative_tokens": 1\n    }' in r.output


def test_bad_values_are_refused_naming_the_key(tmp_path):
    with pytest.raises(SettingsError, match=r"engine.speculative.num_speculative_tokens: must be an integer >= 1"):
        load_settings(None, {"model": str(tmp_path), "engine": {"speculative": {"method": "ngram",
                                                                                "num_speculative_tokens": 0}}})
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--num-speculative-tokens", "2", "--print-config"])
    assert r.exit_code != 0 and "needs --speculative-method" in r.output


def test_acceptance_counters_have_vllm_names():
    spec = SpecDecodeStats(num_drafts=10, num_draft_tokens=20, num_accepted_tokens=7, accepted_per_position=[5, 2])
    snap = LoadSnapshot(admitted=0, queued=0, num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                        prefix_cache_hits=0, num_preemptions=0, prompt_tokens_total=0, generation_tokens_total=0,
                        ready=True, spec_decode=spec)
    text = generate_latest(ServerMetrics(lambda: snap, model_name="r1").registry).decode()
    assert 'vllm:spec_decode_num_drafts_total{model_name="r1"} 10.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="r1"} 20.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="r1"} 7.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="r1",position="1"} 2.0' in text
    assert spec.acceptance_rate == 0.35 and spec.mean_accepted_length == 1.7
