"""Prometheus metrics of the inference engine: batching, queueing, forward latency, model swaps."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class InferenceMetrics:
    """The engine's collectors, registered in `registry` (a fresh CollectorRegistry in tests)."""

    def __init__(self, *, registry: CollectorRegistry, namespace: str = "rxverify") -> None:
        def name(suffix: str) -> str:
            return f"{namespace}_{suffix}"

        self.registry = registry
        self.batch_size = Histogram(name("inference_batch_size"), "Requests per model forward pass.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.queue_wait = Histogram(name("inference_queue_wait_seconds"),
                                    "Time from submit to the start of the request's forward pass.",
                                    buckets=WAIT_BUCKETS, registry=registry)
        self.inference_seconds = Histogram(name("inference_forward_seconds"),
                                           "Wall time of one batched forward pass, softmax included.",
                                           buckets=FORWARD_BUCKETS, registry=registry)
        self.queue_depth = Gauge(name("inference_queue_depth"), "Requests waiting for a batch.", registry=registry)
        self.rejected = Counter(name("inference_rejected_total"), "Requests the engine refused, by reason.",
                                ["reason"], registry=registry)
        self.swaps = Counter(name("model_swaps_total"), "Model loads and swaps, by outcome.", ["outcome"],
                             registry=registry)
        self.swap_seconds = Histogram(name("model_swap_seconds"), "Load + warm-up + swap time of a model.",
                                      buckets=SWAP_BUCKETS, registry=registry)
        self.swap_failed = Gauge(name("model_swap_failed"),
                                 "Alert: 1 when the latest model load or warm-up failed (the previous model "
                                 "keeps serving), 0 after a successful swap.", registry=registry)
        self.model = Info(name("model"), "The model version being served.", registry=registry)
        self.ready = Gauge(name("model_ready"), "1 when a warmed-up model is serving.", registry=registry)


_default: InferenceMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> InferenceMetrics:
    """The process-wide metrics on prometheus_client's default REGISTRY (what /metrics exposes)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = InferenceMetrics(registry=REGISTRY)
        return _default
