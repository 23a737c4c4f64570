"""The controller end to end: real Mosquitto, three nodes with their own agents (tiny model) and
three simulated device profiles, a release of three variants rolled out in waves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp import web

from edge_agent.app import create_app
from edge_agent.keys import RUNNER, STATE
from edge_agent.settings import AgentSettings, ApiKey
from fleet.artifact_server import ArtifactCatalog, add_artifact_routes
from fleet.controller import Controller, ControllerConfig
from fleet.node import Node, NodeConfig
from fleet.rollout import Gates, RolloutSpec, RolloutStatus
from fleet.store import Store
from quantize.profiles import PROFILES
from tests.fleet.conftest import client_settings, unique_id, within

KEYS = [{"name": "node", "sha256": ApiKey.hash("node-secret"), "admin": True}]
WAIT_S = 120
# Three sites' devices: the planner gives each the best variant of the release that fits it.
DEVICES = {"orin": "jetson-orin-nano-8gb", "t4": "t4-16gb", "a10": "a10-24gb"}
EXPECTED = {"orin": "int4-te8", "t4": "int8-te8", "a10": "bf16"}


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.to_thread(lambda: None)


@pytest.fixture
async def fleet(broker, aiohttp_server, tiny_model_dir: Path, tmp_path: Path):
    catalog = ArtifactCatalog()
    artifacts_app = web.Application()
    add_artifact_routes(artifacts_app, catalog)
    artifacts_server = await aiohttp_server(artifacts_app)
    store = Store.open(tmp_path / "fleet.db")
    controller = Controller(
        ControllerConfig(controller_id=unique_id("ctl"), mqtt=client_settings(broker),
                         artifact_base_url=str(artifacts_server.make_url("")), tick_s=0.1),
        store, catalog,
    )  # fmt: skip
    stop = asyncio.Event()
    tasks = [asyncio.create_task(controller.run(stop), name="test-controller")]
    agents = {}
    prefix = unique_id("node")
    for name, profile in DEVICES.items():
        app = create_app(AgentSettings(model=str(tiny_model_dir), api_keys=KEYS))
        server = await aiohttp_server(app)
        await asyncio.wait_for(app[STATE].warmed.wait(), WAIT_S)
        agents[f"{prefix}-{name}"] = app
        node = Node(
            NodeConfig(node_id=f"{prefix}-{name}", mqtt=client_settings(broker), agent_url=str(server.make_url("")),
                       agent_key="node-secret", store_dir=tmp_path / name, telemetry_interval_s=0.1,
                       labels={"site": name}),
            facts=PROFILES[profile].facts(),
        )  # fmt: skip
        tasks.append(asyncio.create_task(node.run(stop), name=f"test-node-{name}"))
    yield controller, store, agents, prefix
    stop.set()
    for task in tasks:
        await within(task, WAIT_S)
    store.close()


async def test_a_release_rolls_out_in_waves_each_node_on_its_best_variant(fleet, tiny_model_dir, artifacts) -> None:
    controller, store, agents, prefix = fleet
    await _until(lambda: sum(1 for n in store.list_nodes() if n.facts and n.online) == 3, "three nodes to report")
    directories = [artifacts.get(tiny_model_dir, variant) for variant in ("bf16", "int8-te8", "int4-te8")]
    release = await asyncio.to_thread(controller.publish_release, "r1", directories)
    by_variant = {v.variant: v.artifact_id for v in release.variants}
    spec = RolloutSpec(release="r1", waves=(1, "100%"), bake_s=0.3, gates=Gates(max_error_rate=0.5),
                       node_timeout_s=WAIT_S)  # fmt: skip
    state = controller.create_rollout(spec)
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
