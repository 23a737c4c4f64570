from __future__ import annotations

from edge_agent.cache import ResultCache, cache_key
from edge_agent.images import ImageStore
from edge_agent.runner import JobOutput
from tests.agent.conftest import SMALL
from zimage_edge.request import GenerationRequest


async def test_seeded_requests_are_cached(start_agent) -> None:
    client = await start_agent()
    first = await (await client.post("/v1/generate", json={**SMALL, "seed": 4})).json()
    second = await (await client.post("/v1/generate", json={**SMALL, "seed": 4})).json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["images"] == second["images"]
    other_format = await (await client.post("/v1/generate", json={**SMALL, "seed": 4, "output_format": "webp"})).json()
    assert other_format["cached"] is False
    unseeded = [await (await client.post("/v1/generate", json=SMALL)).json() for _ in range(2)]
    assert [u["cached"] for u in unseeded] == [False, False]
    metrics = await (await client.get("/metrics")).text()
    assert "zimage_cache_hits_total 1.0" in metrics
    assert "zimage_cache_misses_total 2.0" in metrics


def _output(size: int) -> JobOutput:
    return JobOutput(images=[b"x" * size], mime="image/png", seeds=[0], timings={}, gpu_seconds=0.0)


def test_lru_is_bounded_in_bytes() -> None:
    cache = ResultCache(max_bytes=250)
    for key in "abc":
        cache.put(key, _output(100))
    assert cache.get("a") is None  # evicted: 300 bytes > 250
    assert cache.bytes == 200
    cache.get("b")  # b is now the most recent
    cache.put("d", _output(100))
    assert cache.get("c") is None
    assert cache.get("b") is not None
    cache.put("huge", _output(1000))
    assert cache.get("huge") is None
    assert len(cache) == 2


def test_cache_key_covers_artifact_and_request() -> None:
    request = GenerationRequest(prompt="p", seed=1, width=64, height=64)
    assert cache_key("art", request.model_copy(update={"seed": None}), "png") is None
    base = cache_key("art", request, "png")
    assert base == cache_key("art", GenerationRequest(prompt="p", seed=1, width=64, height=64), "png")
    assert base != cache_key("other-artifact", request, "png")
    assert base != cache_key("art", request.model_copy(update={"steps": 4}), "png")
    assert base != cache_key("art", request, "jpeg")


def test_image_store_expires() -> None:
    now = [0.0]
    store = ImageStore(ttl_s=10, clock=lambda: now[0])
    image_id = store.put(b"png", "image/png", owner="kiosk")
    found = store.get(image_id, reader="kiosk")
    assert found is not None
    assert (found.mime, found.data) == ("image/png", b"png")
    now[0] = 10.5
    assert store.get(image_id, reader="kiosk") is None
