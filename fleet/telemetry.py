"""What a node reports every interval: the system (psutil), its GPU where the platform says, and its
agent's own view (scraped from the agent's ``/metrics``, never by importing it).

Agent figures are over the interval, from the difference of two scrapes: latency p50/p95 interpolated
from the ``zimage_request_seconds`` histogram buckets of the generation routes (what Prometheus'
``histogram_quantile`` does), the error rate as 5xx answers over all answers of those routes (a 499,
a client that left, is not the node's error). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from fleet.protocol import AgentStats, GpuStats, SystemStats

GENERATION_ROUTES = frozenset({"/v1/generate", "/v1/images/generations", "/sdapi/v1/txt2img"})


@dataclass(frozen=True)
class Scrape:
    """The counters of one ``/metrics`` answer that telemetry needs."""

    buckets: dict[float, float]  # upper bound (s) -> cumulative count, generation routes summed
    requests: float
    errors: float
    queue_depth: int
    images: int


def parse_metrics(text: str) -> Scrape:
    buckets: dict[float, float] = {}
    requests = errors = 0.0
    queue_depth = images = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            route = sample.labels.get("route")
            if sample.name == "zimage_request_seconds_bucket" and route in GENERATION_ROUTES:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == "zimage_requests_total" and route in GENERATION_ROUTES:
                requests += sample.value
                if sample.labels.get("status", "").startswith("5"):
                    errors += sample.value
            elif sample.name == "pending_generation_tasks":
                queue_depth = int(sample.value)
            elif sample.name == "zimage_images_generated_total":
                images = int(sample.value)
    return Scrape(buckets, requests, errors, queue_depth, images)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile``: the bucket holding the q-th observation, linearly interpolated."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # past the last finite bucket: its bound is all that is known
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class AgentWatch:
    """Turns successive scrapes into per-interval figures."""

    previous: Scrape | None = field(default=None)

    def update(self, current: Scrape) -> AgentStats:
        before = self.previous or Scrape({}, 0.0, 0.0, 0, 0)
        if current.requests < before.requests:  # the agent restarted: its counters began again
            before = Scrape({}, 0.0, 0.0, 0, 0)
        self.previous = current
        delta = {b: current.buckets[b] - before.buckets.get(b, 0.0) for b in current.buckets}
        requests = current.requests - before.requests
        p50, p95 = quantile(0.5, delta), quantile(0.95, delta)
        return AgentStats(
            queue_depth=current.queue_depth,
            latency_p50_ms=None if p50 is None else round(p50 * 1000, 3),
            latency_p95_ms=None if p95 is None else round(p95 * 1000, 3),
            error_rate=(current.errors - before.errors) / requests if requests > 0 else 0.0,
            images_generated=current.images,
        )


def system_stats(store_dir: Path) -> SystemStats:
    """CPU, memory, the disk that holds the model store, and temperature sensors (blocking: a thread)."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(store_dir))
    return SystemStats(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_used=memory.total - memory.available,
        memory_total=memory.total,
        disk_free=disk.free,
        disk_total=disk.total,
        temperatures=dict(_temperatures()),
    )


def _temperatures() -> Iterable[tuple[str, float]]:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on some platforms
    if read is None:
        return
    for chip, sensors in read().items():
        for index, sensor in enumerate(sensors[:4]):
            yield f"{chip}_{sensor.label or index}"[:64], float(sensor.current)


def gpu_stats(unified_memory: bool) -> GpuStats | None:
    """NVML where the driver has it; on unified memory (Jetson) the GPU's memory is the system's, which
    ``system`` already reports; None where neither says anything."""
    if unified_memory:
        return None
    try:
        import pynvml  # optional: nvidia-ml-py, present on GPU nodes
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return GpuStats(memory_used=int(memory.used), memory_total=int(memory.total), util_percent=float(util.gpu))
    except pynvml.NVMLError:
        return None
