"""What must survive: telemetry produced while the broker or the controller is down arrives after it
returns (every seq once), a controller restart picks its rollout up, junk on the wire is counted."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from edge_agent.app import create_app
from edge_agent.keys import RUNNER, STATE
from edge_agent.settings import AgentSettings, ApiKey
from fleet.api import create_controller_app
from fleet.artifact_server import ArtifactCatalog
from fleet.auth import ApiToken, Role
from fleet.broker import free_port
from fleet.controller import Controller, ControllerConfig
from fleet.node import Node, NodeConfig
from fleet.rollout import RolloutSpec, RolloutStatus
from fleet.schema import telemetry
from fleet.store import Store
from quantize.profiles import PROFILES
from tests.fleet.conftest import SecureBroker, unique_id, within

KEYS = [{"name": "node", "sha256": ApiKey.hash("node-secret"), "admin": True}]
WAIT_S = 120


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.to_thread(lambda: None)


class Fleet:
    """One node with its agent, and a controller that can be stopped and started again on one store."""

    def __init__(self, secure: SecureBroker, tmp_path: Path, port: int, agent_url: str, **node: object) -> None:
        self.secure, self.broker, self.tmp_path, self.port = secure, secure.broker, tmp_path, port
        self.controller_id = unique_id("ctl")
        node_id = unique_id("node")
        self.store = Store.open(tmp_path / "fleet.db")
        self.catalog = ArtifactCatalog()
        self.node = Node(
            NodeConfig(node_id=node_id, mqtt=secure.settings(node_id), agent_url=agent_url,
                       agent_key="node-secret", store_dir=tmp_path / "store", telemetry_interval_s=0.1,
                       **node),
            facts=PROFILES["a10-24gb"].facts(),
        )  # fmt: skip
        self.node_stop = asyncio.Event()
        self.node_task = asyncio.create_task(self.node.run(self.node_stop), name="test-node")
        self.controller: Controller | None = None

    async def start_controller(self, aiohttp_server) -> Controller:
        self.controller = Controller(
            ControllerConfig(controller_id=self.controller_id,
                             mqtt=self.secure.settings(self.controller_id, controller=True),
                             artifact_base_url=f"http://127.0.0.1:{self.port}", tick_s=0.1),
            self.store, self.catalog,
        )  # fmt: skip
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.controller.run(self.stop), name="test-controller")
        if not hasattr(self, "server"):
            self.server = await aiohttp_server(
                create_controller_app(self.controller, [ApiToken.of("ops", "t", Role.OPERATOR)]), port=self.port
            )
        return self.controller

    async def stop_controller(self) -> None:
        self.stop.set()
        await within(self.task, WAIT_S)

    def produced(self) -> int:
        """The node's highest seq so far (telemetry and events share it)."""
        return max((row.seq for row in self.node.outbox.pending(10_000)), default=0)


@pytest.fixture
def node_options() -> dict[str, object]:
    return {}


@pytest.fixture
async def fleet(secure_broker, aiohttp_server, tiny_model_dir: Path, tmp_path: Path, node_options):
    app = create_app(AgentSettings(model=str(tiny_model_dir), api_keys=KEYS))
    server = await aiohttp_server(app)
    await asyncio.wait_for(app[STATE].warmed.wait(), WAIT_S)
    the_fleet = Fleet(secure_broker, tmp_path, free_port(), str(server.make_url("")), **node_options)
    the_fleet.agent_app = app  # type: ignore[attr-defined]
    await the_fleet.start_controller(aiohttp_server)
    yield the_fleet
    the_fleet.node_stop.set()
    await within(the_fleet.node_task, WAIT_S)
    if not the_fleet.stop.is_set():
        await the_fleet.stop_controller()
    the_fleet.store.close()


def _all_stored(fleet: Fleet, upto: int) -> bool:
    return fleet.store.ack_watermark(fleet.node.config.node_id) >= upto


async def test_telemetry_made_while_the_broker_is_down_arrives_once(fleet: Fleet) -> None:
    node_id = fleet.node.config.node_id
    await _until(lambda: fleet.store.ack_watermark(node_id) >= 3, "telemetry to flow")
    fleet.broker.stop()
    before = fleet.produced()
    await _until(lambda: fleet.produced() >= before + 5, "telemetry made while the broker is down")
    made_offline = fleet.produced()
    assert fleet.store.ack_watermark(node_id) < made_offline  # the controller has not seen those yet
    fleet.broker.restart()
    await _until(lambda: _all_stored(fleet, made_offline), "every seq made while down to be stored")
    stored = fleet.store.telemetry_count(node_id)
    assert stored >= made_offline  # each seq 1..made_offline is in the store (the watermark is contiguous)
    # The acknowledged rows left the node's outbox: nothing piles up once the controller has them.
    await _until(lambda: all(r.seq > made_offline for r in fleet.node.outbox.pending(10_000)), "the outbox to let go")


async def test_telemetry_made_while_the_controller_is_down_arrives_after_it_returns(
    fleet: Fleet, aiohttp_server
) -> None:
    node_id = fleet.node.config.node_id
    await _until(lambda: fleet.store.ack_watermark(node_id) >= 3, "telemetry to flow")
    await fleet.stop_controller()
    before = fleet.produced()
    await _until(lambda: fleet.produced() >= before + 5, "telemetry made while the controller is down")
    made = fleet.produced()
    await fleet.start_controller(aiohttp_server)  # same id: its persistent session kept the messages
    await _until(lambda: _all_stored(fleet, made), "what was made while the controller was down")


@pytest.mark.parametrize("node_options", [{"resend_after_s": 0.5}])
async def test_messages_a_controller_never_stored_are_sent_again(fleet: Fleet, aiohttp_server) -> None:
    """The broker delivered them to a controller session that is gone for good (a replica that died, a
    controller given a new identity): the node is still connected, so only its resend brings them."""
    node_id = fleet.node.config.node_id
    await _until(lambda: fleet.store.ack_watermark(node_id) >= 3, "telemetry to flow")
    await fleet.stop_controller()
    before = fleet.produced()
    await _until(lambda: fleet.produced() >= before + 5, "telemetry made while the controller is down")
    made = fleet.produced()
    fleet.controller_id = unique_id("ctl-new")  # a fresh session: the old one keeps what was queued for it
    await fleet.start_controller(aiohttp_server)
    await _until(lambda: _all_stored(fleet, made), "every seq, the ones stranded in the old session too")
    assert fleet.node.counters.get("resent", 0) >= 1
    assert fleet.store.telemetry_count(node_id) >= made


@pytest.mark.parametrize("node_options", [{"resend_after_s": 0.5}])
async def test_batches_the_database_refuses_are_counted_and_their_telemetry_comes_again(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails (a failover, a full disk): the controller's ingest goes on with the next batch,
    and what the refused ones held is stored once the node sends it again."""
    node_id = fleet.node.config.node_id
    controller = fleet.controller
    assert controller is not None
    await _until(lambda: fleet.store.ack_watermark(node_id) >= 3, "telemetry to flow")
    ingest, refused = fleet.store.ingest, []

    def failing(*args: object, **kwargs: object) -> object:
        if len(refused) < 5:  # the database is away for five batches
            refused.append(args)
            raise OperationalError("INSERT ...", {}, Exception("server closed the connection unexpectedly"))
        return ingest(*args, **kwargs)

    monkeypatch.setattr(fleet.store, "ingest", failing)
    await _until(lambda: len(refused) == 5, "five refused batches")
    made = fleet.produced()
    await _until(lambda: _all_stored(fleet, made), "every seq of the refused batches, sent again")
    assert controller.ingest_failures == 5
    assert not fleet.task.done()  # the controller ran on
    assert fleet.node.counters.get("resent", 0) >= 1
    assert fleet.store.telemetry_count(node_id) >= made


@pytest.mark.parametrize("node_options", [{"resend_after_s": 0.5}])
async def test_a_controller_far_behind_drops_at_its_queue_limit_and_the_nodes_fill_the_gap(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingest stalls (a slow disk): what arrives past the client's queue limit is dropped and counted
    on /metrics; once the ingest moves again the node's resends bring every seq."""
    controller = fleet.controller
    assert controller is not None
    node_id = fleet.node.config.node_id
    await _until(lambda: fleet.store.ack_watermark(node_id) >= 3, "telemetry to flow")
    monkeypatch.setattr(controller.mqtt, "settings", controller.mqtt.settings.model_copy(update={"queue_limit": 2}))
    ingest, slow = fleet.store.ingest, threading.Event()

    def stalled(*args: object, **kwargs: object) -> object:
        slow.wait(WAIT_S)
        return ingest(*args, **kwargs)

    monkeypatch.setattr(fleet.store, "ingest", stalled)
    await _until(lambda: controller.mqtt.counters.get("queue_full", 0) >= 3, "messages dropped at the queue")
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as http,
        http.get(f"http://127.0.0.1:{fleet.port}/metrics") as response,
    ):
        text = await response.text()
    line = next(x for x in text.splitlines() if x.startswith('zimage_fleet_mqtt_dropped_total{reason="queue_full"}'))
    assert float(line.split()[-1]) >= 3
    slow.set()
    made = fleet.produced()
    await _until(lambda: _all_stored(fleet, made), "every seq, the dropped ones sent again")
    assert fleet.node.counters.get("resent", 0) >= 1


async def test_ticks_the_database_refuses_are_skipped_and_the_lease_comes_back(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is locked past its busy timeout when the tick renews the lease: that tick is skipped,
    leadership lapses by the controller's own clock, and a later tick takes the lease again."""
    controller = fleet.controller
    assert controller is not None
    await _until(lambda: controller.leader, "the lease")
    acquire, refused = fleet.store.acquire_lease, []

    def locked(*args: object, **kwargs: object) -> bool:
        if len(refused) < 3:
            refused.append(args)
            raise OperationalError("INSERT INTO leases ...", {}, Exception("database is locked"))
        return acquire(*args, **kwargs)

    monkeypatch.setattr(fleet.store, "acquire_lease", locked)
    controller._lease_renewed_at = -1e9  # due for renewal now (as after a lease time of lock waits)
    await _until(lambda: len(refused) == 3 and controller.leader, "the lease after three refused ticks")
    assert controller.tick_failures == 3
    assert not fleet.task.done()


async def test_a_restarted_controller_resumes_its_rollout(
    fleet: Fleet, aiohttp_server, tiny_model_dir, artifacts
) -> None:
    node_id = fleet.node.config.node_id
    assert fleet.controller is not None
    await _until(lambda: (n := fleet.store.get_node(node_id)) is not None and n.facts is not None, "the node")
    release = await asyncio.to_thread(
        fleet.controller.publish_release, "r1", [artifacts.get(tiny_model_dir, "int8")], allow_unsigned=True
    )
    state = await fleet.controller.create_rollout(RolloutSpec(release="r1", waves=("100%",), bake_s=1.0,
                                                        node_timeout_s=WAIT_S))  # fmt: skip
    await _until(lambda: fleet.store.get_node(node_id).reported_generation >= 1, "the node to install")
    await fleet.stop_controller()  # mid-rollout: the node is baking
    assert fleet.store.load_rollout(state.id).status is RolloutStatus.RUNNING
    await fleet.start_controller(aiohttp_server)
    await _until(lambda: fleet.store.load_rollout(state.id).status is not RolloutStatus.RUNNING, "the rollout")
    assert fleet.store.load_rollout(state.id).status is RolloutStatus.SUCCEEDED
    assert fleet.agent_app[RUNNER].identity.id == release.variants[0].artifact_id  # type: ignore[attr-defined]


async def test_malformed_and_misplaced_payloads_are_counted_and_ignored(fleet: Fleet, make_client) -> None:
    assert fleet.controller is not None
    topics = fleet.controller.topics
    node_id = fleet.node.config.node_id
    # The controller has subscribed once it has heard from the node (junk sent before would miss it).
    await _until(lambda: fleet.store.get_node(node_id) is not None, "the controller to hear from the node")
    # A node with credentials sending junk on its own topics (the ACL keeps it off everyone else's).
    intruder_id = unique_id("intruder")
    intruder = make_client(fleet.secure.settings(intruder_id), intruder_id)
    await intruder.start()
    await intruder.publish(topics.telemetry(intruder_id), b"{not json", qos=1)
    await intruder.publish(topics.telemetry(intruder_id), b'{"v": 1, "node": "someone-else", "seq": 1}', qos=1)
    await intruder.publish(topics.reported(intruder_id), b'{"v": 9}', qos=1)
    await _until(lambda: {"malformed", "version"} <= set(fleet.controller.dropped), "the drops to be counted")
    assert fleet.controller.dropped.get("node_mismatch", 0) + fleet.controller.dropped.get("schema", 0) >= 1
    counts = fleet.store.drop_counts()
    assert counts[("mqtt", "malformed")] >= 1
    assert fleet.store.get_node("someone-else") is None  # nothing of it was stored


async def test_a_broker_restart_mid_rollout_still_converges(fleet: Fleet, tiny_model_dir, artifacts) -> None:
    node_id = fleet.node.config.node_id
    assert fleet.controller is not None
    await _until(lambda: (n := fleet.store.get_node(node_id)) is not None and n.facts is not None, "the node")
    release = await asyncio.to_thread(
        fleet.controller.publish_release, "r1", [artifacts.get(tiny_model_dir, "int8")], allow_unsigned=True
    )
    state = await fleet.controller.create_rollout(
        RolloutSpec(release="r1", waves=("100%",), bake_s=1.0, node_timeout_s=WAIT_S)
    )
    await _until(lambda: fleet.store.get_node(node_id).desired_generation >= 1, "the desired state to go out")
    fleet.broker.stop()  # mid-rollout: both sides lose the broker
    fleet.broker.restart()
    await _until(lambda: fleet.store.load_rollout(state.id).status is not RolloutStatus.RUNNING, "the rollout")
    assert fleet.store.load_rollout(state.id).status is RolloutStatus.SUCCEEDED
    assert fleet.agent_app[RUNNER].identity.id == release.variants[0].artifact_id  # type: ignore[attr-defined]


@pytest.mark.parametrize("node_options", [{"outbox_max_rows": 5}])
async def test_an_outbox_that_overflowed_says_what_it_dropped_and_the_ack_passes_it(fleet: Fleet) -> None:
    node_id = fleet.node.config.node_id
    await _until(lambda: fleet.store.ack_watermark(node_id) >= 2, "telemetry to flow")
    fleet.broker.stop()
    await _until(lambda: fleet.node.outbox.dropped >= 10, "the outbox to overflow while the broker is down")
    made = fleet.produced()
    fleet.broker.restart()
    # The dropped seqs are declared (an event, which is never dropped), so the watermark passes them.
    await _until(lambda: fleet.store.ack_watermark(node_id) >= made, "the ack to pass the dropped seqs")
    await _until(lambda: all(r.seq > made for r in fleet.node.outbox.pending(10_000)), "the outbox to empty")
    # Some telemetry was really lost, and said so: of the seqs made before the broker came back (the node
    # goes on measuring after it, so only those count), fewer than all are stored.
    with fleet.store.engine.connect() as conn:
        kept = conn.execute(
            select(func.count()).select_from(telemetry)
            .where(telemetry.c.node == node_id, telemetry.c.kind == "telemetry", telemetry.c.seq <= made)
        ).scalar_one()  # fmt: skip
    assert kept < made
