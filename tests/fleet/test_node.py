"""The node sidecar end to end: real Mosquitto, a real agent on the tiny model, artifacts over HTTP.

The test plays the controller: it publishes ``desired`` and reads what the node reports.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from aiohttp import web

from edge_agent.app import create_app
from edge_agent.keys import RUNNER, STATE
from edge_agent.settings import AgentSettings, ApiKey
from fleet.artifact_server import ArtifactCatalog, add_artifact_routes
from fleet.model_store import artifact_url
from fleet.node import Node, NodeConfig
from fleet.protocol import DesiredState, Event, EventPhase, ReportedState, Telemetry, Topics
from tests.conftest import CPU_FACTS
from tests.fleet.conftest import unique_id, wait_until, within

KEYS = [{"name": "node", "sha256": ApiKey.hash("node-secret"), "admin": True}]
WAIT_S = 60


class Site:
    """An agent, an artifact server, a node sidecar and the test as controller, on one broker."""

    def __init__(self, agent_app: web.Application, node: Node, controller, base_url: str, catalog) -> None:
        self.agent_app, self.node, self.controller, self.base_url, self.catalog = (
            agent_app, node, controller, base_url, catalog,
        )  # fmt: skip
        self.topics = Topics()
        self.reported: list[ReportedState] = []
        self.events: list[Event] = []
        self.telemetry: list[Telemetry] = []

    async def collect(self) -> None:
        async for message in self.controller.messages():
            model = self.topics.decode(message.topic, message.payload).model
            if isinstance(model, ReportedState):
                self.reported.append(model)
            elif isinstance(model, Event):
                self.events.append(model)
            elif isinstance(model, Telemetry):
                self.telemetry.append(model)

    async def desire(self, artifact: Path, generation: int) -> DesiredState:
        manifest = self.catalog.add(artifact)
        desired = DesiredState.for_manifest(
            self.node.config.node_id, generation=generation, release="r1", manifest=manifest,
            url=artifact_url(self.base_url, manifest.artifact_id), ts=1.0,
        )  # fmt: skip
        await self.controller.publish(*self.topics.outgoing(desired))
        return desired

    def serving(self) -> str | None:
        identity = self.agent_app[RUNNER].identity
        return identity.id if identity else None


@pytest.fixture
async def site(secure_broker, make_client, aiohttp_server, tiny_model_dir: Path, tmp_path: Path):
    agent_app = create_app(AgentSettings(model=str(tiny_model_dir), api_keys=KEYS))
    agent_server = await aiohttp_server(agent_app)
    await asyncio.wait_for(agent_app[STATE].warmed.wait(), WAIT_S)
    catalog = ArtifactCatalog()
    artifacts_app = web.Application()
    add_artifact_routes(artifacts_app, catalog)
    artifacts_server = await aiohttp_server(artifacts_app)
    node_id = unique_id("node")
    config = NodeConfig(
        node_id=node_id, mqtt=secure_broker.settings(node_id), agent_url=str(agent_server.make_url("")),
        agent_key="node-secret", store_dir=tmp_path / "store", telemetry_interval_s=0.2,
        labels={"site": "lab", "class": "cpu"},
    )  # fmt: skip
    node = Node(config, facts=CPU_FACTS)
    controller_id = unique_id("controller")
    controller = make_client(secure_broker.settings(controller_id, controller=True), controller_id)
    await controller.start()
    topics = Topics()
    await controller.subscribe([(topics.reported(node_id), 1), (topics.events(node_id), 1),
                                (topics.telemetry(node_id), 1)])  # fmt: skip
    the_site = Site(agent_app, node, controller, str(artifacts_server.make_url("")), catalog)
    collector = asyncio.create_task(the_site.collect(), name="test-collector")
    stop = asyncio.Event()
    runner = asyncio.create_task(node.run(stop), name="test-node")
    yield the_site
    stop.set()
    await within(runner, WAIT_S)
    collector.cancel()
    await asyncio.gather(collector, return_exceptions=True)


async def test_the_node_installs_what_it_is_told_and_the_agent_serves_it(site: Site, tiny_model_dir, artifacts) -> None:
    await wait_until(lambda: bool(site.reported), WAIT_S)
    first = site.reported[-1]
    assert first.generation == 0
    assert first.health.ready
    assert first.labels == {"site": "lab", "class": "cpu"}
    assert first.device is not None
    assert first.device.to_facts() == CPU_FACTS
    desired = await site.desire(artifacts.get(tiny_model_dir, "int8"), generation=1)
    await wait_until(lambda: any(r.generation == 1 for r in site.reported), WAIT_S)
    applied = next(r for r in site.reported if r.generation == 1)
    assert applied.running is not None
    assert applied.running.artifact_id == desired.artifact_id
    assert applied.last_error is None
    assert site.serving() == desired.artifact_id
    assert site.node.store.has(desired.artifact_id)
    phases = [(e.kind.value, e.phase.value) for e in site.events if e.generation == 1]
    assert phases[0] == ("download", "started")
    assert phases[-1] == ("swap", "succeeded")
    # Telemetry flows, through the outbox, with the agent's view in it.
    await wait_until(lambda: any(t.agent is not None for t in site.telemetry), WAIT_S)
    # One seq, one message: QoS 1 is at least once, so a copy may come twice (a slow PUBACK, a resend),
    # but a seq is never reused for another message.
    by_seq: dict[int, set[str]] = {}
    for message in [*site.telemetry, *site.events]:
        by_seq.setdefault(message.seq, set()).add(message.model_dump_json())
    assert all(len(copies) == 1 for copies in by_seq.values()), by_seq
    assert len(by_seq) >= 2


async def test_a_tampered_artifact_is_refused_and_the_old_model_keeps_serving(
    site: Site, tiny_model_dir, artifacts, tmp_path: Path
) -> None:
    await wait_until(lambda: bool(site.reported), WAIT_S)
    before = site.serving()
    source = Path(shutil.copytree(artifacts.get(tiny_model_dir, "int8-te8"), tmp_path / "served"))
    desired = await site.desire(source, generation=1)  # registered (verified) as it was
    weight = sorted((source / "transformer").glob("model-*.safetensors"))[0]
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 0x01  # then altered where it is served
    weight.write_bytes(bytes(data))
    await wait_until(lambda: any(e.phase is EventPhase.FAILED for e in site.events), WAIT_S)
    failed = next(e for e in site.events if e.phase is EventPhase.FAILED)
    assert failed.reason == "hash"
    assert failed.generation == 1
    assert site.serving() == before  # the agent was never asked to swap
    assert not site.node.store.has(desired.artifact_id)
    await wait_until(lambda: any(r.last_error for r in site.reported), WAIT_S)
    report = [r for r in site.reported if r.last_error][-1]
    assert report.generation == 0
    assert "does not match its sha256" in report.last_error
