"""Telemetry figures from a real agent metrics registry, over an interval."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from edge_agent.metrics import Metrics
from fleet.telemetry import AgentWatch, parse_metrics, quantile, system_stats


def _scrape(metrics: Metrics):
    return parse_metrics(generate_latest(metrics.registry).decode())


def test_interval_latency_errors_and_counters() -> None:
    metrics = Metrics.create()
    watch = AgentWatch()
    for _ in range(10):
        metrics.request_seconds.labels("/v1/generate").observe(0.2)
        metrics.requests.labels("/v1/generate", "200").inc()
    metrics.requests.labels("/metrics", "500").inc()  # not a generation route: not counted
    metrics.images.inc(10)
    first = watch.update(_scrape(metrics))
    assert first.error_rate == 0.0
    assert first.images_generated == 10
    assert 100 < first.latency_p50_ms <= 250  # in the (0.1, 0.25] bucket
    # The next interval: slower answers and some failures; the first interval no longer counts.
    for status in ("200", "200", "503", "499"):
        metrics.request_seconds.labels("/sdapi/v1/txt2img").observe(4.0)
        metrics.requests.labels("/sdapi/v1/txt2img", status).inc()
    second = watch.update(_scrape(metrics))
    assert second.error_rate == pytest.approx(1 / 4)  # the 503; a client that left (499) is not an error
    assert 2500 < second.latency_p95_ms <= 5000
    idle = watch.update(_scrape(metrics))
    assert (idle.latency_p50_ms, idle.error_rate) == (None, 0.0)


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, float("inf"): 40.0}
    assert quantile(0.25, buckets) == pytest.approx(0.1)  # the 10th of 40 is the top of the first bucket
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (10 / 20))
    assert quantile(0.5, {}) is None


def test_an_agent_restart_resets_the_baseline() -> None:
    before, after = Metrics.create(), Metrics.create()
    watch = AgentWatch()
    for _ in range(5):
        before.requests.labels("/v1/generate", "500").inc()
    watch.update(_scrape(before))
    after.requests.labels("/v1/generate", "200").inc()
    assert watch.update(_scrape(after)).error_rate == 0.0  # not (1 - 5) / ... across the restart


def test_system_stats_read_the_store_disk(tmp_path: Path) -> None:
    stats = system_stats(tmp_path)
    assert 0 < stats.memory_used <= stats.memory_total
    assert 0 < stats.disk_free <= stats.disk_total
