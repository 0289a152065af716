"""Operational metrics for Prometheus (GET /metrics/prometheus), one registry per app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Telemetry:
    """The service's counters and histograms."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    batch_size: Histogram
    client_requests: Counter

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


def make_telemetry(
    queue_depth: Callable[[], float],
    requests_in_progress: Callable[[], float],
    video_jobs: Callable[[], float],
    video_uploads: Callable[[], float],
) -> Telemetry:
    """A fresh registry: the request counter, latency and batch-size histograms, and four gauges read when scraped."""
    registry = CollectorRegistry()
    requests = Counter("fer_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    # By the client's name from the keys file ("anonymous" without one; "-" for a refused key):
    # bounded by the file, never a key and never an address.
    client_requests = Counter(
        "fer_client_requests", "HTTP requests by client and status", ["client", "status"], registry=registry
    )
    latency = Histogram(
        "fer_request_duration_seconds",
        "request latency by route",
        ["route"],
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )
    batch_size = Histogram(
        "fer_batch_size", "images per forward pass, per face served", buckets=BATCH_BUCKETS, registry=registry
    )
    depth = Gauge("fer_queue_depth", "faces waiting for a forward pass", registry=registry)
    depth.set_function(queue_depth)
    in_progress = Gauge("fer_requests_in_progress", "HTTP requests being served now", registry=registry)
    in_progress.set_function(requests_in_progress)
    videos = Gauge("fer_video_jobs", "videos being analysed now (FER_MAX_VIDEO_JOBS)", registry=registry)
    videos.set_function(video_jobs)
    uploads = Gauge("fer_video_uploads", "videos being uploaded now (FER_MAX_VIDEO_UPLOADS)", registry=registry)
    uploads.set_function(video_uploads)
    return Telemetry(
        registry=registry, requests=requests, latency=latency, batch_size=batch_size, client_requests=client_requests
    )
