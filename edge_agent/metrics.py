"""Prometheus metrics, on a registry owned by each app (nothing registers at import)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Seconds: from a cache hit (~1 ms) to a 1024x1024 image on a small GPU (~30 s) and slow CPU runs.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    queue_wait: Histogram
    generation_seconds: Histogram
    pending: Gauge
    batch_size: Histogram
    images: Counter
    cache_hits: Counter
    cache_misses: Counter
    model_load_seconds: Gauge
    model: Info
    gpu_memory: Gauge
    usage_images: Counter
    usage_megapixel_steps: Counter
    usage_gpu_seconds: Counter
    ready: Gauge
    cpu_threads: Gauge

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry(auto_describe=True)
        return cls(
            registry=r,
            requests=Counter("zimage_requests", "HTTP requests by route and status", ["route", "status"], registry=r),
            request_seconds=Histogram(
                "zimage_request_seconds", "time from request to response", ["route"], buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            queue_wait=Histogram(
                "zimage_queue_wait_seconds", "time a job waited for its batch", buckets=LATENCY_BUCKETS, registry=r
            ),
            generation_seconds=Histogram(
                "zimage_generation_seconds", "time a batch spent in the model", buckets=LATENCY_BUCKETS, registry=r
            ),
            # The autoscaling signal (KEDA/HPA): requests waiting for the GPU.
            pending=Gauge("pending_generation_tasks", "requests waiting in the queue", registry=r),
            batch_size=Histogram("zimage_batch_images", "images per micro-batch", buckets=BATCH_BUCKETS, registry=r),
            images=Counter("zimage_images_generated", "images generated", registry=r),
            cache_hits=Counter("zimage_cache_hits", "requests answered from the result cache", registry=r),
            cache_misses=Counter("zimage_cache_misses", "cacheable requests not in the cache", registry=r),
            model_load_seconds=Gauge("zimage_model_load_seconds", "duration of the last model load", registry=r),
            model=Info("zimage_model", "the loaded model", registry=r),
            gpu_memory=Gauge("zimage_gpu_memory_bytes", "GPU memory allocated by the model", registry=r),
            usage_images=Counter("zimage_usage_images", "images per API key", ["key"], registry=r),
            usage_megapixel_steps=Counter(
                "zimage_usage_megapixel_steps", "width*height/1e6*steps*images per API key", ["key"], registry=r
            ),
            usage_gpu_seconds=Counter("zimage_usage_gpu_seconds", "model time per API key", ["key"], registry=r),
            ready=Gauge("zimage_ready", "1 when the agent accepts work", registry=r),
            cpu_threads=Gauge("zimage_cpu_threads", "torch intra-op threads (zimage_edge.cpu)", registry=r),
        )  # fmt: skip
