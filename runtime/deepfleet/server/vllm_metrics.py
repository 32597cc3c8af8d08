"""vLLM's metric names, so vLLM's Grafana dashboard, the production stack's router and KEDA/HPA recipes read this
server unchanged. They are views, computed at scrape time from the same instruments and the same engine snapshot
as the `deepseek_*` metrics: every observation is recorded once, and both names always agree. Labelled
`model_name` (the served model id) as vLLM's are; runtime/README.md has the mapping."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

P = "vllm:"


def _merged(histogram: Histogram, bounds: tuple[float, ...],
            keep: Callable[[dict[str, str]], bool]) -> tuple[list[tuple[str, float]], float]:
    """One histogram's label sets that pass `keep`, summed into one (buckets add up across label sets); all
    zero, with the same bounds, before the first observation."""
    buckets = {floatToGoString(b): 0.0 for b in (*bounds, float("inf"))}
    total = 0.0
    for family in histogram.collect():
        for s in family.samples:
            if not keep(s.labels):
                continue
            if s.name.endswith("_bucket"):
                buckets[s.labels["le"]] = buckets.get(s.labels["le"], 0.0) + s.value
            elif s.name.endswith("_sum"):
                total += s.value
    return sorted(buckets.items(), key=lambda b: float(b[0])), total


class VllmView(Collector):
    def __init__(self, model_name: str, snapshot: Callable[[], Any],
                 histograms: dict[str, tuple[Histogram, tuple[float, ...]]]) -> None:
        """`histograms`: ttft, tpot, queue_time, latency of ServerMetrics, each with its bucket bounds."""
        self._model = [model_name]
        self._snapshot = snapshot
        self._h = histograms

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(P + name, doc, labels=["model_name"])
        family.add_metric(self._model, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(P + name, doc, labels=["model_name"])
        family.add_metric(self._model, value)
        return family

    def _histogram(self, name: str, doc: str, source: str,
                   keep: Callable[[dict[str, str]], bool] = lambda _labels: True) -> HistogramMetricFamily:
        buckets, total = _merged(*self._h[source], keep)
        family = HistogramMetricFamily(P + name, doc, labels=["model_name"])
        family.add_metric(self._model, buckets, total)
        return family

    def _spec_decode(self, spec) -> Iterator[Any]:
        """vLLM v1's speculative-decoding counters (engine.speculative set)."""
        yield self._counter("spec_decode_num_drafts", "Sequence-steps that verified drafts", spec.num_drafts)
        yield self._counter("spec_decode_num_draft_tokens", "Draft tokens scored", spec.num_draft_tokens)
        yield self._counter("spec_decode_num_accepted_tokens", "Draft tokens accepted", spec.num_accepted_tokens)
        family = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by "
                                     "position in the draft", labels=["model_name", "position"])
        for position, count in enumerate(spec.accepted_per_position):
            family.add_metric([*self._model, str(position)], count)
        yield family

    @staticmethod
    def _lora_info(lora) -> GaugeMetricFamily:
        """vLLM's LoRA gauge, as LoRA-aware routers read it (the Gateway API inference extension's endpoint picker):
        the slots and the adapters in use as labels (comma-separated names), the snapshot's time as the value
        (readers take the newest series). One series: the labels of this scrape."""
        family = GaugeMetricFamily(P + "lora_requests_info", "Running stats on LoRA requests",
                                   labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        family.add_metric([str(lora.max_loras), ",".join(lora.running), ",".join(lora.waiting)], time.time())
        return family

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        yield self._gauge("num_requests_running", "Requests the engine is running", s.num_running)
        # vLLM has no admission queue in front of its scheduler: waiting there is waiting here
        yield self._gauge("num_requests_waiting", "Requests waiting (admission queue + engine scheduler)",
                          s.queued + s.num_waiting)
        yield self._gauge("gpu_cache_usage_perc", "KV-cache usage (0..1; vLLM V0 name)", s.kv_cache_usage)
        yield self._gauge("kv_cache_usage_perc", "KV-cache usage (0..1)", s.kv_cache_usage)
        yield self._counter("prompt_tokens", "Prompt tokens processed", s.prompt_tokens_total)
        yield self._counter("generation_tokens", "Tokens generated", s.generation_tokens_total)
        yield self._counter("num_preemptions", "Sequences preempted", s.num_preemptions)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                            s.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits)
        if s.spec_decode:  # None (or a placeholder 0) without engine.speculative
            yield from self._spec_decode(s.spec_decode)
        if s.lora:  # None (or a placeholder 0) with LoRA off
            yield self._lora_info(s.lora)
        yield self._histogram("time_to_first_token_seconds", "Time to first token", "ttft")
        yield self._histogram("request_time_per_output_token_seconds", "Mean time per output token, per request",
                              "tpot")
        yield self._histogram("request_queue_time_seconds", "Time waiting before the engine took the request",
                              "queue_time")
        yield self._histogram("e2e_request_latency_seconds", "End-to-end latency of requests answered 200",
                              "latency", lambda labels: labels.get("status") == "200")
