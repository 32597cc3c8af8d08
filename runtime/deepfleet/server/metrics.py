"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process).

Names follow the source documents (`deepseek_inference_latency_seconds`, `deepseek_inference_requests_total`)
and the recording/alert rules in monitoring/rules/. The latency histogram and the request counter carry the
same labels (endpoint, status) and see the same requests, so the documents' PromQL
`rate(deepseek_inference_latency_seconds_sum[5m]) / rate(deepseek_inference_requests_total[5m])` is the mean
latency series by series. vLLM's names are views of the same instruments (vllm_metrics.py). runtime/README.md
documents every metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from deepfleet.engine.outputs import LoRAStats
from deepfleet.engine.spec_decode.metrics import SpecDecodeStats
from deepfleet.server.vllm_metrics import VllmView

log = logging.getLogger(__name__)

# 0.08 s is the HPA target, 0.1 s / 0.5 s the chat / general P99 alert thresholds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1)


@dataclass(frozen=True)
class LoadSnapshot:
    """What the gauges read at scrape time (engine counters are cumulative totals)."""

    admitted: int  # HTTP requests holding an admission slot (at most max_concurrent)
    queued: int  # HTTP requests waiting for a slot
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    ready: bool
    spec_decode: SpecDecodeStats | None = None  # engine.speculative set: acceptance counters
    lora: LoRAStats | None = None  # LoRA on: slots and the adapters in use


class _LoadCollector(Collector):
    def __init__(self, snapshot: Callable[[], LoadSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._snapshot()
        p = "deepseek_inference_"
        yield GaugeMetricFamily("deepseek_server_ready", "1 once the model is loaded and warmed up", s.ready)
        yield GaugeMetricFamily(p + "admitted_requests", "HTTP requests holding an admission slot", s.admitted)
        yield GaugeMetricFamily(p + "admission_queue_requests", "HTTP requests waiting for a slot", s.queued)
        yield GaugeMetricFamily(p + "running_requests", "Sequences the engine is running", s.num_running)
        yield GaugeMetricFamily(p + "waiting_requests", "Sequences waiting in the engine scheduler", s.num_waiting)
        yield GaugeMetricFamily(
            p + "queue_length", "Requests waiting anywhere (admission queue + engine waiting)", s.queued + s.num_waiting
        )
        yield GaugeMetricFamily(p + "kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1)", s.kv_cache_usage)
        yield CounterMetricFamily(p + "prefix_cache_queries", "Prompt tokens looked up", s.prefix_cache_queries)
        yield CounterMetricFamily(p + "prefix_cache_hits", "Prompt tokens found cached", s.prefix_cache_hits)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield GaugeMetricFamily(p + "prefix_cache_hit_rate", "Lifetime prefix-cache hit rate (0..1)", rate)
        yield CounterMetricFamily(p + "preemptions", "Sequences preempted for KV space", s.num_preemptions)
        yield CounterMetricFamily(p + "prompt_tokens", "Prompt tokens processed", s.prompt_tokens_total)
        yield CounterMetricFamily(p + "generated_tokens", "Tokens generated", s.generation_tokens_total)


class _NvmlCollector(Collector):
    """GPU utilisation, memory and temperature per device through NVML (nvidia-ml-py)."""

    def __init__(self, nvml) -> None:
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nv = self._nvml
        util = GaugeMetricFamily("deepseek_gpu_utilization_percent", "GPU busy time share (0-100)", labels=["gpu"])
        used = GaugeMetricFamily("deepseek_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("deepseek_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"])
        temp = GaugeMetricFamily("deepseek_gpu_temperature_celsius", "GPU core temperature", labels=["gpu"])
        for i, handle in enumerate(self._handles):
            gpu = [str(i)]
            util.add_metric(gpu, nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric(gpu, mem.used)
            total.add_metric(gpu, mem.total)
            temp.add_metric(gpu, nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        yield from (util, used, total, temp)


def nvml_collector() -> _NvmlCollector | None:
    """The GPU collector, or None where there is no NVML library or no GPU (the GPU gauges are then absent)."""
    try:
        import pynvml  # nvidia-ml-py (the `gpu` extra)

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return _NvmlCollector(pynvml)
    except Exception as exc:  # ImportError, or NVMLError where the driver is missing
        log.info("no GPU metrics: %s", exc)
        return None


class _Summed:
    """One histogram summed over the API processes, for the vLLM views (which read `collect()`)."""

    def __init__(self, every: MultiProcessCollector, name: str) -> None:
        self._every = every
        self._name = name

    def collect(self) -> list[Metric]:
        return [family for family in self._every.collect() if family.name == self._name]


class ServerMetrics:
    """Per-request instruments; the load gauges are read from `snapshot` at scrape time."""

    def __init__(self, snapshot: Callable[[], LoadSnapshot], gpu: Collector | None = None,
                 model_name: str = "", multiprocess_dir: str | None = None) -> None:
        """`registry`: what /metrics exposes. `multiprocess_dir`: one of several API processes (prometheus_client's
        multiprocess mode, its files there): the counters and histograms exposed are every process's sums."""
        self.registry = CollectorRegistry()
        r = self.registry if multiprocess_dir is None else CollectorRegistry()  # the latter: this process's own
        self.requests = Counter(
            "deepseek_inference_requests", "Inference requests answered, by endpoint and HTTP status (499: the "
            "client went away)", ["endpoint", "status"], registry=r,
        )
        self.latency = Histogram(
            "deepseek_inference_latency_seconds", "End-to-end request latency, arrival to last byte",
            ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "deepseek_inference_ttft_seconds", "Time to first token, arrival to first generated token",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "deepseek_inference_tpot_seconds", "Time per output token after the first, per request",
            ["endpoint"], buckets=TPOT_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "deepseek_inference_queue_time_seconds", "Time from arrival until the engine accepted the request",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=r,
        )
        sources: dict[str, Any] = {"ttft": self.ttft, "tpot": self.tpot, "queue_time": self.queue_time,
                                   "latency": self.latency}
        if multiprocess_dir is not None:
            every = MultiProcessCollector(self.registry, multiprocess_dir)
            sources = {key: _Summed(every, h.describe()[0].name) for key, h in sources.items()}
        bounds = {"ttft": TTFT_BUCKETS, "tpot": TPOT_BUCKETS, "queue_time": TTFT_BUCKETS, "latency": LATENCY_BUCKETS}
        self.registry.register(_LoadCollector(snapshot))
        self.registry.register(VllmView(model_name, snapshot, {k: (sources[k], bounds[k]) for k in bounds}))
        if gpu is not None:
            self.registry.register(gpu)

    def request_done(self, endpoint: str, status: int, latency_s: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint, str(status)).observe(latency_s)
