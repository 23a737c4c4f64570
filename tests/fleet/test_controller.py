"""The controller end to end: real Mosquitto, three nodes with their own agents (tiny model) and
three simulated device profiles, a release of three variants rolled out in waves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from edge_agent.app import create_app
from edge_agent.keys import RUNNER, STATE
from edge_agent.runner import default_batch_fn
from edge_agent.settings import AgentSettings, ApiKey
from fleet.api import create_controller_app
from fleet.artifact_server import ArtifactCatalog
from fleet.auth import ApiToken, Role
from fleet.broker import free_port
from fleet.controller import Controller, ControllerConfig
from fleet.node import Node, NodeConfig
from fleet.rollout import Gates, RolloutSpec, RolloutStatus
from fleet.store import Store
from quantize.profiles import PROFILES
from tests.fleet.conftest import unique_id, within

TOKEN = "operator-token"
KEYS = [{"name": "node", "sha256": ApiKey.hash("node-secret"), "admin": True}]
WAIT_S = 120
# Three sites' devices: the planner gives each the best variant of the release that fits it.
DEVICES = {"orin": "jetson-orin-nano-8gb", "t4": "t4-16gb", "a10": "a10-24gb"}
EXPECTED = {"orin": "int4-te8", "t4": "int8-te8", "a10": "bf16"}


class FailSwitch:
    """The real generation, until a test makes this agent fail every request (a bad variant's symptom)."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self, pipe, requests, **kwargs):
        if self.failing:
            raise RuntimeError("simulated: this variant breaks on this device")
        return default_batch_fn(pipe, requests, **kwargs)


SWITCH = web.AppKey("test_switch", FailSwitch)
URL = web.AppKey("test_url", dict[str, str])  # filled once the test server has its port


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.to_thread(lambda: None)


@pytest.fixture
async def fleet(secure_broker, aiohttp_server, tiny_model_dir: Path, tmp_path: Path):
    store = Store.open(tmp_path / "fleet.db")
    port = free_port()
    controller = Controller(
        ControllerConfig(controller_id=(ctl := unique_id("ctl")), mqtt=secure_broker.settings(ctl, controller=True),
                         artifact_base_url=f"http://127.0.0.1:{port}", tick_s=0.1),
        store, ArtifactCatalog(),
    )  # fmt: skip
    # The controller's own HTTP server: the operators' API and the artifacts the nodes download.
    api = await aiohttp_server(
        create_controller_app(controller, [ApiToken.of("ops", TOKEN, Role.OPERATOR)]),
        port=port,
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(controller.run(stop), name="test-controller")]
    agents = {}
    prefix = unique_id("node")
    for name, profile in DEVICES.items():
        switch = FailSwitch()
        app = create_app(AgentSettings(model=str(tiny_model_dir), api_keys=KEYS), batch_fn=switch)
        app[SWITCH] = switch
        app[URL] = where = {}
        server = await aiohttp_server(app)
        where["url"] = str(server.make_url("")).rstrip("/")
        await asyncio.wait_for(app[STATE].warmed.wait(), WAIT_S)
        agents[f"{prefix}-{name}"] = app
        node = Node(
            NodeConfig(node_id=f"{prefix}-{name}", mqtt=secure_broker.settings(f"{prefix}-{name}"),
                       agent_url=str(server.make_url("")),
                       agent_key="node-secret", store_dir=tmp_path / name, telemetry_interval_s=0.1,
                       labels={"site": name}),
            facts=PROFILES[profile].facts(),
        )  # fmt: skip
        tasks.append(asyncio.create_task(node.run(stop), name=f"test-node-{name}"))
    controller.api = api  # type: ignore[attr-defined]
    yield controller, store, agents, prefix
    stop.set()
    for task in tasks:
        await within(task, WAIT_S)
    store.close()


async def test_a_release_rolls_out_in_waves_each_node_on_its_best_variant(fleet, tiny_model_dir, artifacts) -> None:
    controller, store, agents, prefix = fleet
    await _until(lambda: sum(1 for n in store.list_nodes() if n.facts and n.online) == 3, "three nodes to report")
    directories = [artifacts.get(tiny_model_dir, variant) for variant in ("bf16", "int8-te8", "int4-te8")]
    release = await asyncio.to_thread(controller.publish_release, "r1", directories, allow_unsigned=True)
    by_variant = {v.variant: v.artifact_id for v in release.variants}
    spec = RolloutSpec(release="r1", waves=(1, "100%"), bake_s=0.3, gates=Gates(max_error_rate=0.5),
                       node_timeout_s=WAIT_S)  # fmt: skip
    state = await controller.create_rollout(spec)
    targets = {node.node: node.target for node in state.nodes}
    assert {node: target.variant for node, target in targets.items()} == {
        f"{prefix}-{name}": variant for name, variant in EXPECTED.items()
    }

    def finished() -> bool:
        current = store.load_rollout(state.id)
        return current is not None and current.status is not RolloutStatus.RUNNING

    await _until(finished, "the rollout to finish")
    final = store.load_rollout(state.id)
    assert final is not None
    assert final.status is RolloutStatus.SUCCEEDED, final.reason
    for node_id, app in agents.items():
        served = app[RUNNER].identity
        assert served is not None
        assert served.id == by_variant[EXPECTED[node_id.rsplit("-", 1)[1]]]
        record = store.get_node(node_id)
        assert record is not None
        assert record.artifact == served.id
        assert record.reported_generation >= 1
    # Telemetry reached the store once per (node, seq), and the acks let the outboxes go.
    for node_id in agents:
        assert store.telemetry_count(node_id) > 0
        assert store.ack_watermark(node_id) > 0


async def test_the_operators_api(fleet, tiny_model_dir, artifacts) -> None:
    controller, store, _agents, prefix = fleet
    base = str(controller.api.make_url("")).rstrip("/")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    await _until(lambda: sum(1 for n in store.list_nodes() if n.facts and n.online) == 3, "three nodes to report")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/api/v1/nodes") as response:
            assert response.status == 401
        async with session.get(f"{base}/healthz") as response:
            assert (await response.json())["mqtt_connected"] is True
        directories = [str(artifacts.get(tiny_model_dir, v)) for v in ("bf16", "int8-te8", "int4-te8")]
        async with session.post(f"{base}/api/v1/releases", json={"name": "r2", "artifacts": directories},
                                headers=auth) as response:  # fmt: skip
            assert response.status == 422
            assert "not signed" in (await response.json())["error"]["message"]
        body = {"name": "r2", "artifacts": directories, "allow_unsigned": True}
        async with session.post(f"{base}/api/v1/releases", json=body, headers=auth) as response:
            assert response.status == 201, await response.text()
            assert set((await response.json())["variants"]) == {"bf16", "int8-te8", "int4-te8"}
        async with session.post(f"{base}/api/v1/releases", json=body, headers=auth) as response:
            assert response.status == 422  # releases never change
        async with session.get(f"{base}/api/v1/nodes?explain=r2", headers=auth) as response:
            nodes = {n["id"]: n for n in (await response.json())["nodes"]}
        assert nodes[f"{prefix}-orin"]["variant"] == "int4-te8"
        assert nodes[f"{prefix}-a10"]["variant"] == "bf16"
        assert nodes[f"{prefix}-a10"]["explanation"].startswith("bf16 with placement resident")
        async with session.post(f"{base}/api/v1/rollouts", json={"release": "r2", "waves": "all"},
                                headers=auth) as response:  # fmt: skip
            assert response.status == 422
        body = {"release": "r2", "waves": ["100%"], "bake_s": 0.2, "node_timeout_s": WAIT_S,
                "pinned": {f"{prefix}-a10": "int8-te8"}}  # fmt: skip
        async with session.post(f"{base}/api/v1/rollouts", json=body, headers=auth) as response:
            assert response.status == 201, await response.text()
            rollout_id = (await response.json())["id"]
        async with session.post(f"{base}/api/v1/rollouts/{rollout_id}/pause", headers=auth) as response:
            assert (await response.json())["status"] == "paused"
        async with session.post(f"{base}/api/v1/rollouts/{rollout_id}/resume", headers=auth) as response:
            assert (await response.json())["status"] == "running"

        def done() -> bool:
            state = store.load_rollout(rollout_id)
            return state is not None and state.status is not RolloutStatus.RUNNING

        await _until(done, "the rollout to finish")
        async with session.get(f"{base}/api/v1/rollouts/{rollout_id}", headers=auth) as response:
            assert (await response.json())["status"] == "succeeded"
        pinned = store.get_node(f"{prefix}-a10")
        release = store.get_release("r2")
        assert pinned is not None
        assert release is not None
        assert pinned.artifact == release.variant("int8-te8").artifact_id  # the operator's pin won
        async with session.get(f"{base}/api/v1/rollouts/ro-missing", headers=auth) as response:
            assert response.status == 404
        async with session.get(f"{base}/metrics", headers=auth) as response:
            text = await response.text()
        assert 'zimage_fleet_nodes{device="NVIDIA T4 16 GB",online="true"} 1.0' in text
        assert 'zimage_fleet_rollouts{status="succeeded"} 1.0' in text


async def test_the_status_page_shows_nodes_and_rollout_waves_in_chromium(fleet, tiny_model_dir, artifacts) -> None:
    from playwright.async_api import async_playwright

    from tests.agent.test_web_page import CHROMIUM, CHROMIUM_ARGS

    controller, store, _agents, prefix = fleet
    await _until(lambda: sum(1 for n in store.list_nodes() if n.facts and n.online) == 3, "three nodes to report")
    directories = [artifacts.get(tiny_model_dir, variant) for variant in ("bf16", "int8-te8", "int4-te8")]
    await asyncio.to_thread(controller.publish_release, "r3", directories, allow_unsigned=True)
    state = await controller.create_rollout(
        RolloutSpec(release="r3", waves=("100%",), bake_s=0.2, node_timeout_s=WAIT_S)
    )
    await _until(lambda: store.load_rollout(state.id).status is not RolloutStatus.RUNNING, "the rollout")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(str(controller.api.make_url("/")))
            await page.fill("#token", "wrong")
            await page.click("#load")
            await page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=WAIT_S * 1000)
            await page.fill("#token", TOKEN)
            await page.click("#load")
            await page.wait_for_function(
                f"document.querySelector('table[data-rollout=\"{state.id}\"]')?.dataset.status === 'succeeded'",
                timeout=WAIT_S * 1000,
            )
            rows = await page.eval_on_selector_all("#nodes tbody tr", "rows => rows.map(r => r.dataset.node)")
            assert sorted(rows) == sorted(f"{prefix}-{name}" for name in DEVICES)
            assert "NVIDIA A10 24 GB" in await page.inner_text("#nodes")
            waves = await page.inner_text(f'table[data-rollout="{state.id}"]')
            assert waves.count("baked") == 3
        finally:
            await browser.close()


async def test_a_gate_breach_stops_the_rollout_and_rolls_the_node_back(fleet, tiny_model_dir, artifacts) -> None:
    controller, store, agents, prefix = fleet
    await _until(lambda: sum(1 for n in store.list_nodes() if n.facts and n.online) == 3, "three nodes to report")
    first = f"{prefix}-a10"  # the first wave is one node, the first by id
    original = {node: app[RUNNER].identity.id for node, app in agents.items()}
    directories = [artifacts.get(tiny_model_dir, variant) for variant in ("bf16", "int8-te8", "int4-te8")]
    await asyncio.to_thread(controller.publish_release, "r4", directories, allow_unsigned=True)
    spec = RolloutSpec(release="r4", waves=(1, "100%"), bake_s=3.0, gates=Gates(max_error_rate=0.2),
                       node_timeout_s=WAIT_S)  # fmt: skip
    state = await controller.create_rollout(spec)
    await _until(lambda: agents[first][RUNNER].identity.id != original[first], "the first node to swap")
    agents[first][SWITCH].failing = True  # the new variant fails on this device
    async with aiohttp.ClientSession() as session:
        for seed in range(4):
            body = {"prompt": "a red circle", "width": 64, "height": 64, "seed": seed}
            headers = {"Authorization": "Bearer node-secret"}
            async with session.post(f"{agents[first][URL]['url']}/v1/generate", json=body, headers=headers) as response:
                assert response.status == 500
    await _until(lambda: store.load_rollout(state.id).status is not RolloutStatus.RUNNING, "the gate to stop it")
    final = store.load_rollout(state.id)
    assert final.status is RolloutStatus.FAILED
    assert "error rate" in final.reason
    agents[first][SWITCH].failing = False
    # The touched node goes back to what it ran (a plain directory no controller serves: no download).
    await _until(lambda: agents[first][RUNNER].identity.id == original[first], "the rollback of the first node")
    for node, app in agents.items():
        assert app[RUNNER].identity.id == original[node]  # the second wave never started
