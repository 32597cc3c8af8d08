"""vLLM's metric names beside ours: same registry, computed from the same observations (nothing counted twice),
values that agree with the deepseek_* series."""

from __future__ import annotations

import httpx
from prometheus_client import generate_latest
from server_helpers import MODEL_NAME

from deepfleet.server.metrics import LoadSnapshot, ServerMetrics


def _scrape(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_vllm_names_are_views_of_the_same_instruments():
    snap = LoadSnapshot(admitted=2, queued=3, num_running=4, num_waiting=5, kv_cache_usage=0.25,
                        prefix_cache_queries=10, prefix_cache_hits=4, num_preemptions=1, prompt_tokens_total=100,
                        generation_tokens_total=50, ready=True)
    m = ServerMetrics(lambda: snap, model_name="r1")
    m.request_done("/v1/chat/completions", 200, 0.2)
    m.request_done("/v1/completions", 200, 0.3)
    m.request_done("/v1/completions", 400, 0.01)  # refused: not a served request for vLLM's e2e histogram
    m.ttft.labels("/v1/chat/completions").observe(0.04)
    m.ttft.labels("/v1/completions").observe(0.07)
    v = _scrape(generate_latest(m.registry).decode())
    label = '{model_name="r1"}'
    assert v[f"vllm:num_requests_running{label}"] == 4
    assert v[f"vllm:num_requests_waiting{label}"] == 8  # admission queue 3 + scheduler 5
    assert v[f"vllm:gpu_cache_usage_perc{label}"] == v[f"vllm:kv_cache_usage_perc{label}"] == 0.25
    assert v[f"vllm:prompt_tokens_total{label}"] == 100 and v[f"vllm:generation_tokens_total{label}"] == 50
    assert v[f"vllm:prefix_cache_hits_total{label}"] == 4 and v[f"vllm:num_preemptions_total{label}"] == 1
    assert v[f"vllm:e2e_request_latency_seconds_count{label}"] == 2
    assert abs(v[f"vllm:e2e_request_latency_seconds_sum{label}"] - 0.5) < 1e-9
    assert v[f"vllm:time_to_first_token_seconds_count{label}"] == 2
    assert v['vllm:time_to_first_token_seconds_bucket{le="0.05",model_name="r1"}'] == 1
    assert v['vllm:time_to_first_token_seconds_bucket{le="0.08",model_name="r1"}'] == 2
    # the source series are unchanged by the views
    assert v['deepseek_inference_ttft_seconds_count{endpoint="/v1/completions"}'] == 1


def test_live_server_vllm_series_follow_requests(server):
    before = _scrape(httpx.get(server.url + "/metrics").text)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4,
                                                        "ignore_eos": True}, timeout=30)
    assert r.status_code == 200
    after = _scrape(httpx.get(server.url + "/metrics").text)
    label = f'{{model_name="{MODEL_NAME}"}}'

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew(f"vllm:e2e_request_latency_seconds_count{label}") == 1
    assert grew(f"vllm:time_to_first_token_seconds_count{label}") == 1
    assert grew(f"vllm:generation_tokens_total{label}") == 4
    assert grew(f"vllm:prompt_tokens_total{label}") == r.json()["usage"]["prompt_tokens"]
    assert after[f"vllm:generation_tokens_total{label}"] == after["deepseek_inference_generated_tokens_total"]
