"""Controller replicas on one store and one broker: the ingest shared through an MQTT v5 shared
subscription (clean sessions), rollouts driven by the one replica that holds the lease, and taken over
by another when it dies. The store is a real PostgreSQL (the scale-out engine); nodes are simulated
(``fleet.simulate``: real MQTT connections in this event loop)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from fleet.artifact_server import ArtifactCatalog
from fleet.controller import Controller, ControllerConfig
from fleet.rollout import RolloutSpec, RolloutStatus
from fleet.simulate import SimFleet, node_ids
from fleet.store import Store
from tests.fleet.conftest import SecureBroker, unique_id

WAIT_S = 60.0
POLL_S = 0.02  # between looks at the store while waiting: short next to a tick
LEASE_S = 1.0  # short, so that a takeover happens within the test


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)  # polling the store with a deadline


def test_one_holder_at_a_time_and_a_lapsed_lease_is_taken(make_store_database: Callable[[], str]) -> None:
    clock = Clock()
    with Store.open(make_store_database(), clock=clock) as store:
        assert store.acquire_lease("rollouts", "a", ttl_s=10) is True
        assert store.acquire_lease("rollouts", "b", ttl_s=10) is False
        clock.now += 9
        assert store.acquire_lease("rollouts", "a", ttl_s=10) is True  # renewed until 1019
        clock.now += 9
        assert store.acquire_lease("rollouts", "b", ttl_s=10) is False
        assert store.lease_holder("rollouts") == "a"
        clock.now += 2  # a stopped renewing: lapsed at 1019
        assert store.acquire_lease("rollouts", "b", ttl_s=10) is True
        assert store.acquire_lease("rollouts", "a", ttl_s=10) is False
        store.release_lease("rollouts", "a")  # not a's to release: nothing happens
        assert store.lease_holder("rollouts") == "b"
        store.release_lease("rollouts", "b")  # a clean stop hands over at once
        assert store.lease_holder("rollouts") is None
        assert store.acquire_lease("rollouts", "a", ttl_s=10) is True
        with pytest.raises(ValueError, match="ttl"):
            store.acquire_lease("rollouts", "a", ttl_s=0)


def _replica(broker: SecureBroker, database: str, name: str) -> Controller:
    config = ControllerConfig(
        controller_id=name, mqtt=broker.settings(name, controller=True), artifact_base_url="http://127.0.0.1:1",
        tick_s=0.1, min_step_interval_s=0.05, replica_group="controllers", lease_ttl_s=LEASE_S,
    )  # fmt: skip
    return Controller(config, Store.open(database), ArtifactCatalog())


def _sim_fleet(broker: SecureBroker, count: int) -> SimFleet:
    """``count`` simulated nodes, each provisioned on the site's broker as a real node is."""
    names = node_ids(count, prefix=unique_id("sim"))
    broker.provision(*names)
    node_settings = {name: broker.settings(name) for name in names}
    passwords = {name: settings.password.get_secret_value() for name, settings in node_settings.items()
                 if settings.password is not None}  # fmt: skip
    return SimFleet(names, ["t4-16gb", "a10-24gb", "jetson-orin-nano-8gb"], host=broker.host, port=broker.port,
                    interval_s=0.05, resend_after_s=1.0, ca_file=node_settings[names[0]].ca_file,
                    passwords=passwords)  # fmt: skip


async def test_replicas_share_the_ingest_and_the_survivor_finishes_the_rollout(
    secure_broker: SecureBroker, postgres_url: str, tiny_model_dir, artifacts
) -> None:
    fleet = _sim_fleet(secure_broker, 12)  # provisioned before anything runs
    replicas = [_replica(secure_broker, postgres_url, unique_id(name)) for name in ("ctl-a", "ctl-b")]
    stops = [asyncio.Event() for _ in replicas]
    runs = [
        asyncio.create_task(c.run(stop), name=f"test-{c.config.controller_id}")
        for c, stop in zip(replicas, stops, strict=True)
    ]
    store = replicas[0].store
    try:
        await _until(lambda: all(c.subscribed.is_set() for c in replicas), "both replicas to subscribe")
        await fleet.connect(WAIT_S)
        fleet.start_telemetry()
        await _until(lambda: sum(1 for n in store.list_nodes() if n.facts and n.online) == 12, "12 nodes")
        # Both replicas ingest telemetry: the broker deals the shared subscription out between them.
        await _until(lambda: all(c.ingested["telemetry"] >= 20 for c in replicas), "telemetry at both replicas")
        directories = [artifacts.get(tiny_model_dir, v) for v in ("bf16", "int8-te8", "int4-te8")]
        await asyncio.to_thread(replicas[0].publish_release, "r1", directories, allow_unsigned=True)
        await _until(lambda: any(c.leader for c in replicas), "a leader")
        leader = next(c for c in replicas if c.leader)
        survivor = next(c for c in replicas if c is not leader)
        assert store.lease_holder("rollouts") == leader.config.controller_id
        assert not survivor.leader
        spec = RolloutSpec(release="r1", waves=(1, "50%", "100%"), bake_s=0.5, node_timeout_s=WAIT_S)
        state = await survivor.create_rollout(spec)  # any replica takes the operators' requests

        def wave(at_least: int) -> bool:
            current = store.load_rollout(state.id)
            return current is not None and current.wave >= at_least

        await _until(lambda: wave(1), "the first wave")
        # The leader dies without a word: its connection drops, no death message, and its clean-up never
        # runs, so the lease is not handed over: the survivor must wait for it to lapse.
        leader.store.release_lease = lambda *_: None  # type: ignore[method-assign]
        await leader.mqtt.abort()
        runs[replicas.index(leader)].cancel()
        await _until(lambda: survivor.leader, "the survivor to take the lease", timeout_s=LEASE_S * 10)
        assert store.lease_holder("rollouts") == survivor.config.controller_id

        def finished() -> bool:
            current = store.load_rollout(state.id)
            return current is not None and current.status is not RolloutStatus.RUNNING

        await _until(finished, "the rollout to finish")
        final = store.load_rollout(state.id)
        assert final is not None
        assert final.status is RolloutStatus.SUCCEEDED, final.reason
        for node in fleet.nodes:
            record, target = store.get_node(node.node_id), final.node(node.node_id).target
            assert record is not None
            assert target is not None
            assert record.artifact == target.artifact
        # Every seq produced is stored once, whichever replica took it.
        await fleet.stop_telemetry()
        assert await fleet.drain(WAIT_S)
        produced = sum(node.stats.produced for node in fleet.nodes)
        assert store.telemetry_count(kind="telemetry") == produced
        assert survivor.ingested["telemetry"] + leader.ingested["telemetry"] >= produced
    finally:
        await fleet.close()
        for stop in stops:
            stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        # SQL a cancelled task left running in a worker thread finishes before its connection pool goes.
        await asyncio.get_running_loop().shutdown_default_executor()
        for controller in replicas:
            controller.store.close()
