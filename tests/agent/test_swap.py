"""Hot model swap under load: zero failed requests; a failed load keeps the old model serving."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from edge_agent.app import default_loader
from edge_agent.keys import SCHEDULER
from edge_agent.settings import AgentSettings
from tests.agent.conftest import SMALL
from zimage_edge.model.toy import save_toy_model

WAIT_S = 60


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_model(tmp_path_factory.mktemp("models") / "tiny-seed1", size="tiny", seed=1)


class Load:
    """Keeps ``workers`` clients generating until stopped; records every status."""

    def __init__(self, client, workers: int = 3) -> None:
        self.client = client
        self.statuses: list[int] = []
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._work(i), name=f"load-{i}") for i in range(workers)]

    async def _work(self, index: int) -> None:
        seed = index * 1000
        while not self.stop.is_set():
            seed += 1  # distinct seeds: no cache hits
            response = await self.client.post("/v1/generate", json={**SMALL, "seed": seed})
            self.statuses.append(response.status)
            await response.read()

    async def finish(self) -> list[int]:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        return self.statuses


async def _variant_source(client) -> str:
    return (await (await client.get("/v1/models")).json())["data"][0]["source"]


@pytest.mark.parametrize("strategy", ["overlap", "drain"])
async def test_swap_under_continuous_load_fails_nothing(start_agent, second_model: Path, strategy: str) -> None:
    client = await start_agent(swap_strategy=strategy, cache={"max_bytes": 0})
    before = await (await client.post("/v1/generate", json={**SMALL, "seed": 77})).json()
    load = Load(client)
    response = await client.post("/admin/model", json={"model": str(second_model)})
    assert response.status == 200, await response.text()
    assert (await response.json())["strategy"] == strategy
    statuses = await load.finish()
    assert statuses
    assert set(statuses) == {200}
    assert await _variant_source(client) == str(second_model)
    after = await (await client.post("/v1/generate", json={**SMALL, "seed": 77})).json()
    assert after["images"][0]["b64"] != before["images"][0]["b64"]  # new weights draw another image


async def test_failed_load_keeps_the_old_model(start_agent, tiny_model_dir: Path, tmp_path: Path) -> None:
    for strategy in ("overlap", "drain"):
        client = await start_agent(swap_strategy=strategy)
        response = await client.post("/admin/model", json={"model": str(tmp_path / "missing")})
        assert response.status == 422
        error = (await response.json())["error"]
        assert error["code"] == "model_load_failed"
        assert "previous model keeps serving" in error["message"]
        assert await _variant_source(client) == str(tiny_model_dir)
        assert (await client.post("/v1/generate", json=SMALL)).status == 200
        assert (await client.get("/readyz")).status == 200


async def test_readiness_is_down_during_a_drain_swap(start_agent, tiny_model_dir: Path, second_model: Path) -> None:
    real = default_loader(AgentSettings(model=str(tiny_model_dir)))
    release = threading.Event()
    loading = threading.Event()

    def loader(source: str):
        if source == str(second_model):
            loading.set()
            assert release.wait(WAIT_S)
        return real(source)

    client = await start_agent(loader=loader, swap_strategy="drain")
    swap = asyncio.create_task(client.post("/admin/model", json={"model": str(second_model)}))
    assert await asyncio.to_thread(loading.wait, WAIT_S)
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["status"] == "swapping model"
    # Work that still arrives waits in the queue and runs on the new model.
    during = asyncio.create_task(client.post("/v1/generate", json=SMALL))
    scheduler = client.server.app[SCHEDULER]
    await asyncio.wait_for(scheduler.wait_until(lambda: len(scheduler.pending) == 1), WAIT_S)
    metrics = await (await client.get("/metrics")).text()
    assert "\nzimage_ready 0.0\n" in metrics
    assert "\npending_generation_tasks 1.0\n" in metrics
    release.set()
    assert (await swap).status == 200
    assert (await during).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.post("/v1/generate", json=SMALL)).status == 200


async def test_swap_to_a_quantized_artifact(start_agent, tiny_model_dir: Path, artifacts) -> None:
    artifact = artifacts.get(tiny_model_dir, "int8")
    client = await start_agent()
    response = await client.post("/admin/model", json={"model": str(artifact)})
    assert response.status == 200
    entry = (await (await client.get("/v1/models")).json())["data"][0]
    assert entry["id"] == "int8"
    assert entry["quality"]["status"] == "passed"
    assert entry["components"]["transformer"]["qtype"] == "qint8"
    assert (await client.post("/v1/generate", json=SMALL)).status == 200


def test_auto_strategy_measures_weights_against_free_memory(tmp_path: Path, second_model: Path) -> None:
    from edge_agent.swap import fits_beside
    from quantize.models import inspect_source
    from zimage_edge.device import detect_device

    weights = inspect_source(second_model)
    assert 0 < weights < 20 * 2**20  # the weight files of a tiny model: a few MB
    assert fits_beside(weights)
    assert not fits_beside(2 * detect_device().free_memory)
