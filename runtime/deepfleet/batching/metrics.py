"""Prometheus metrics of the batching service, in a registry of its own (one per service instance, so
several services — e.g. in tests — never collide in the process-global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class BatcherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram(
            "deepfleet_batcher_batch_size", "Rows per executed batch.", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )
        self.queue_delay = Histogram(
            "deepfleet_batcher_queue_delay_seconds", "Time a request waited in the queue before its batch ran.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            "deepfleet_batcher_inference_seconds", "Backend execution time of one batch.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "deepfleet_batcher_requests", "Inference requests by outcome.", ["model", "status"], registry=r
        )
        self.queued_rows = Gauge("deepfleet_batcher_queued_rows", "Rows waiting in the queue.", ["model"], registry=r)
        self.target_batch_size = Gauge(
            "deepfleet_batcher_target_batch_size", "Current target batch size (adaptive control).", ["model"],
            registry=r,
        )
