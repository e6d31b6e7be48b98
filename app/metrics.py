"""Prometheus metrics of the HTTP layer (module-level: one registry per process, as prometheus expects)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

HTTP_REQUESTS = Counter("rxverify_http_requests_total", "HTTP requests answered.",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("rxverify_http_request_duration_seconds", "HTTP request latency (seconds).",
                         ["method", "route"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))


def render_metrics() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
