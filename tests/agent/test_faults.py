"""Faults found when the agent was tried as a careless operator would: swaps that lose their client
or fail twice, a drain that runs out of time, shutdown with a load in flight, oversized requests."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from edge_agent.app import default_loader
from edge_agent.keys import RUNNER, SCHEDULER, STATE
from edge_agent.settings import AgentSettings
from edge_agent.swap import drain
from tests.agent.conftest import SMALL
from tests.agent.test_scheduling import GatedBatches
from zimage_edge.model.toy import save_toy_model

WAIT_S = 60


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_model(tmp_path_factory.mktemp("models") / "tiny-seed2", size="tiny", seed=2)


class GatedLoader:
    """The real loader, holding loads of ``held`` sources at a gate; ``fail`` sources fail to load."""

    def __init__(self, model: Path) -> None:
        self.real = default_loader(AgentSettings(model=str(model)))
        self.held: set[str] = set()
        self.fail: set[str] = set()
        self.loading = threading.Event()
        self.release = threading.Event()

    def __call__(self, source: str):
        if source in self.held:
            self.loading.set()
            assert self.release.wait(WAIT_S)
        if source in self.fail:
            raise OSError(f"disk error reading {source}")
        return self.real(source)


async def _until(predicate, what: str) -> None:
    """Poll ``predicate`` (an async callable) until true, within a deadline."""
    deadline = time.monotonic() + WAIT_S
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.to_thread(lambda: None)  # yield to the loop and the executor threads


async def test_a_swap_finishes_when_its_client_disconnects(start_agent, tiny_model_dir: Path, second_model) -> None:
    loader = GatedLoader(tiny_model_dir)
    loader.held.add(str(second_model))
    client = await start_agent(loader=loader, swap_strategy="drain")
    swap = asyncio.create_task(client.post("/admin/model", json={"model": str(second_model)}))
    assert await asyncio.to_thread(loader.loading.wait, WAIT_S)
    swap.cancel()  # the admin client goes away while the old model is unloaded and the new one loads
    with pytest.raises(asyncio.CancelledError):
        await swap
    loader.release.set()
    app = client.server.app

    async def swapped() -> bool:
        identity = app[RUNNER].identity
        return identity is not None and identity.source == str(second_model) and app[STATE].ready

    await _until(swapped, "the swap to finish without its client")
    assert (await client.post("/v1/generate", json=SMALL)).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_a_node_that_lost_its_model_says_so(start_agent, tiny_model_dir: Path, second_model) -> None:
    loader = GatedLoader(tiny_model_dir)
    client = await start_agent(loader=loader, swap_strategy="drain")
    loader.fail |= {str(second_model), str(tiny_model_dir)}  # the new load fails, and so does the restore
    response = await client.post("/admin/model", json={"model": str(second_model)})
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "model_lost"
    assert "keeps serving" not in error["message"]
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "no model loaded" in (await ready.json())["status"]
    refused = await client.post("/v1/generate", json=SMALL)
    assert refused.status == 503
    # A later swap that works brings the node back.
    loader.fail.clear()
    assert (await client.post("/admin/model", json={"model": str(second_model)})).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.post("/v1/generate", json=SMALL)).status == 200


async def test_a_swap_to_a_wrong_directory_is_refused_before_anything_is_walked(
    start_agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start_agent()

    def walked(*_args, **_kwargs):
        raise AssertionError("the swap walked the directory tree before validating it")

    monkeypatch.setattr(Path, "rglob", walked)
    (tmp_path / "a" / "b").mkdir(parents=True)
    response = await client.post("/admin/model", json={"model": str(tmp_path)})
    assert response.status == 422
    error = (await response.json())["error"]
    assert "no model_index.json" in error["message"]
    assert "previous model keeps serving" in error["message"]


async def test_drain_timeout_answers_503_not_a_dropped_connection(start_agent) -> None:
    batches = GatedBatches()
    client = await start_agent(batch_fn=batches, drain_grace_s=0, queue={"max_batch": 1, "batch_window_ms": 0})
    batches.hold()
    running = asyncio.create_task(client.post("/v1/generate", json={**SMALL, "seed": 1}))
    await batches.wait_entered()
    queued = asyncio.create_task(client.post("/v1/generate", json={**SMALL, "seed": 2}))
    app = client.server.app

    async def both_in() -> bool:
        return len(app[SCHEDULER].pending) == 1

    await _until(both_in, "the second request to queue")
    stopped = await drain(app)  # grace 0: the running and the queued job are stopped at once
    batches.gate.set()
    assert stopped == 2
    for task in (running, queued):
        response = await task
        assert response.status == 503
        error = (await response.json())["error"]
        assert error["code"] == "cancelled"
        assert "shutting down" in error["message"]


async def test_closing_the_runner_does_not_block_the_event_loop(start_agent) -> None:
    batches = GatedBatches()
    client = await start_agent(batch_fn=batches)
    batches.hold()
    request = asyncio.create_task(client.post("/v1/generate", json=SMALL))
    await batches.wait_entered()
    runner = client.server.app[RUNNER]
    closing = asyncio.create_task(runner.close())
    # The loop keeps running while the model thread is busy: this round trip through a thread
    # completes although close() waits for the running batch.
    await asyncio.wait_for(asyncio.to_thread(lambda: None), WAIT_S)
    assert not closing.done()
    batches.gate.set()
    await asyncio.wait_for(closing, WAIT_S)
    assert (await request).status == 200


async def test_models_reports_one_identity_and_the_models_own_size(start_agent, tiny_model_dir, artifacts) -> None:
    from quantize.manifest import sha256_file

    started = time.time()
    artifact = artifacts.get(tiny_model_dir, "int8")
    client = await start_agent(model=str(artifact))
    entry = (await (await client.get("/v1/models")).json())["data"][0]
    assert entry["artifact_id"] == sha256_file(artifact / "manifest.json")
    assert entry["variant"] == entry["id"] == "int8"
    assert entry["created"] >= int(started)  # when this model was loaded, not when the module was imported
    assert entry["sizes"]["default"] == {"width": 1024, "height": 1024}
    assert entry["sizes"]["max"] == 1536  # the guard's max_side
    metrics = await (await client.get("/metrics")).text()
    assert f'artifact_id="{entry["artifact_id"]}"' in metrics


async def test_the_shapes_model_announces_its_64px_size(start_agent) -> None:
    from zimage_edge.shapes import PRETRAINED

    client = await start_agent(model=str(PRETRAINED))
    entry = (await (await client.get("/v1/models")).json())["data"][0]
    assert entry["sizes"]["default"] == {"width": 64, "height": 64}


async def test_requests_over_the_devices_budget_are_refused(start_agent) -> None:
    # An Orin Nano's 8 GB: four 2048x2048 images pass the contract and the site's guard here, but
    # their VAE decode alone would need more than the board has.
    client = await start_agent(device_profile="jetson-orin-nano-8gb", guard={"max_side": 2048, "max_images": 8})
    big = {**SMALL, "width": 2048, "height": 2048, "n": 4}
    response = await client.post("/v1/generate", json=big)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "over_device_budget"
    assert "Jetson Orin Nano 8 GB" in error["message"]
    assert (await client.post("/v1/generate", json=SMALL)).status == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prompt": "a red circle on a blue background", "seed": 3}),
        ("/v1/images/generations", {"prompt": "a red circle on a blue background", "seed": 3}),
        ("/sdapi/v1/txt2img", {"prompt": "a red circle on a blue background", "seed": 3}),
    ],
)
async def test_every_api_draws_at_the_models_own_size_by_default(start_agent, path: str, body: dict) -> None:
    import base64

    from tests.agent.conftest import decode_image
    from zimage_edge.shapes import PRETRAINED

    client = await start_agent(model=str(PRETRAINED))
    response = await client.post(path, json=body)
    assert response.status == 200, await response.text()
    data = await response.json()
    images = {"/v1/generate": lambda d: d["images"][0]["b64"], "/v1/images/generations": lambda d: d["data"][0][
        "b64_json"], "/sdapi/v1/txt2img": lambda d: d["images"][0]}  # fmt: skip
    encoded = images[path](data)
    assert decode_image(base64.b64decode(encoded)).size == (64, 64)
