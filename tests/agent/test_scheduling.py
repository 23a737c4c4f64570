"""Micro-batching, backpressure, cancellation on disconnect and timeout, and device OOM handling."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import pytest
import torch

from edge_agent.keys import SCHEDULER
from tests.agent.conftest import SMALL
from zimage_edge.model.generate import generate_batch

WAIT_S = 30  # bound on any wait for the model thread; the tiny model answers in milliseconds


class GatedBatches:
    """The real ``generate_batch``, recording each batch and able to hold the model thread at a gate
    (so a test can fill the queue while the "GPU" is busy)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.cancel_events: list[list[threading.Event]] = []

    def __call__(self, pipe, requests, **kwargs):
        self.sizes.append(len(requests))
        self.cancel_events.append(list(kwargs.get("cancels") or []))
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return generate_batch(pipe, requests, **kwargs)

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S)


async def until(client, predicate) -> None:
    scheduler = client.server.app[SCHEDULER]
    await asyncio.wait_for(scheduler.wait_until(lambda: predicate(scheduler)), WAIT_S)


async def test_concurrent_requests_are_batched(start_agent) -> None:
    batches = GatedBatches()
    client = await start_agent(batch_fn=batches, queue={"max_batch": 4, "batch_window_ms": 0})
    batches.sizes.clear()  # the warm-up
    batches.hold()
    first = asyncio.create_task(client.post("/v1/generate", json={**SMALL, "seed": 1}))
    await batches.wait_entered()  # the model thread is busy with the first request
    others = [asyncio.create_task(client.post("/v1/generate", json={**SMALL, "seed": s})) for s in range(2, 6)]
    await until(client, lambda s: len(s.pending) == 4)
    batches.gate.set()
    responses = await asyncio.gather(first, *others)
    assert [r.status for r in responses] == [200] * 5
    assert batches.sizes == [1, 4]
    seeds = [(await r.json())["images"][0]["seed"] for r in responses]
    assert seeds == [1, 2, 3, 4, 5]


async def test_incompatible_requests_go_in_separate_batches(start_agent) -> None:
    batches = GatedBatches()
    client = await start_agent(batch_fn=batches, queue={"max_batch": 8, "batch_window_ms": 0})
    batches.sizes.clear()
    batches.hold()
    first = asyncio.create_task(client.post("/v1/generate", json=SMALL))
    await batches.wait_entered()
    sizes = [64, 128, 64, 128, 64]
    others = [asyncio.create_task(client.post("/v1/generate", json={**SMALL, "width": w})) for w in sizes]
    await until(client, lambda s: len(s.pending) == 5)
    batches.gate.set()
    assert [r.status for r in await asyncio.gather(first, *others)] == [200] * 6
    assert batches.sizes == [1, 3, 2]  # the 64-wide ones together, then the 128-wide ones


async def test_full_queue_answers_429_with_retry_after(start_agent) -> None:
    batches = GatedBatches()
    client = await start_agent(batch_fn=batches, queue={"max_pending": 2, "max_batch": 1, "batch_window_ms": 0})
    batches.hold()
    running = asyncio.create_task(client.post("/v1/generate", json=SMALL))
    await batches.wait_entered()
    queued = [asyncio.create_task(client.post("/v1/generate", json=SMALL)) for _ in range(2)]
    await until(client, lambda s: len(s.pending) == 2)
    refused = await client.post("/v1/generate", json=SMALL)
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["error"]["code"] == "queue_full"
    batches.gate.set()
    assert [r.status for r in await asyncio.gather(running, *queued)] == [200, 200, 200]
    assert (await client.post("/v1/generate", json=SMALL)).status == 200


async def test_disconnect_cancels_queued_and_running_work(start_agent) -> None:
    batches = GatedBatches()
    client = await start_agent(batch_fn=batches, queue={"max_batch": 1, "batch_window_ms": 0})
    batches.hold()
    url = client.make_url("/v1/generate")
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        running = asyncio.create_task(session.post(url, json={**SMALL, "steps": 50}))
        await batches.wait_entered()
        queued = asyncio.create_task(session.post(url, json=SMALL))
        await until(client, lambda s: len(s.pending) == 1)
        running.cancel()  # both clients hang up
        queued.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
    await until(client, lambda s: not s.pending)  # the queued job left the queue at once
    running_cancel = batches.cancel_events[-1][0]
    assert await asyncio.to_thread(running_cancel.wait, WAIT_S)  # the running job was told to stop
    batches.gate.set()
    await until(client, lambda s: not s.running and not s.pending)
    assert len(batches.sizes) == 2  # warm-up + the running one; the queued one never reached the model
    assert (await client.post("/v1/generate", json=SMALL)).status == 200


async def test_request_timeout_is_504_and_frees_the_slot(start_agent) -> None:
    batches = GatedBatches()
    client = await start_agent(batch_fn=batches, queue={"request_timeout_s": 0.2, "batch_window_ms": 0})
    batches.hold()
    before = len(batches.sizes)
    response = await client.post("/v1/generate", json=SMALL)  # the model thread never answers in time
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "timeout"
    # On a busy machine the deadline may pass before the job reached the model: then it left the
    # queue; otherwise the model thread was told to stop it. Either way its slot is free.
    if len(batches.sizes) > before:
        assert batches.cancel_events[-1][0].is_set()
    else:
        await until(client, lambda s: not s.pending)
    batches.gate.set()
    await until(client, lambda s: not s.running and not s.pending)
    assert (await client.post("/v1/generate", json=SMALL)).status == 200


class OomAboveOneRequest:
    """Stands in for a GPU running out of memory (there is no GPU here): the real generate_batch,
    except that a batch of more than ``limit`` requests raises torch.OutOfMemoryError."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, pipe, requests, **kwargs):
        self.sizes.append(len(requests))
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        if len(requests) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate_batch(pipe, requests, **kwargs)


@pytest.mark.parametrize(("limit", "statuses"), [(1, [200, 200, 200]), (0, [503, 503, 503])])
async def test_out_of_memory_splits_then_answers_503(start_agent, limit: int, statuses: list[int]) -> None:
    fake = OomAboveOneRequest(limit=max(limit, 1))
    client = await start_agent(batch_fn=fake, queue={"max_batch": 4, "batch_window_ms": 0})
    fake.limit = limit
    fake.sizes.clear()
    fake.gate.clear()
    first = asyncio.create_task(client.post("/v1/generate", json={**SMALL, "seed": 1}))
    assert await asyncio.to_thread(fake.entered.wait, WAIT_S)
    rest = [asyncio.create_task(client.post("/v1/generate", json={**SMALL, "seed": s})) for s in (2, 3)]
    await until(client, lambda s: len(s.pending) == 2)
    fake.gate.set()
    responses = await asyncio.gather(first, *rest)
    assert [r.status for r in responses] == statuses
    # Either way the pair that did not fit was split and retried one by one before an answer.
    assert fake.sizes == [1, 2, 1, 1]
    for response in responses:
        body = await response.json()
        if limit == 0:
            assert body["error"]["code"] == "out_of_memory"
        else:
            assert len(body["images"]) == 1
    fake.limit = 8
    assert (await client.post("/v1/generate", json=SMALL)).status == 200  # the process serves on
