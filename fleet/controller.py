"""The fleet controller: ingests what nodes say over MQTT, drives rollouts, tells nodes what to run.

State lives in the store (``fleet.store``, SQL): a restarted controller picks its rollouts up where
they were. Ingest: births/deaths (late wills ignored), ``reported`` states, telemetry and events
(stored once per ``(node, seq)``, then the node's ack watermark is published, retained, so its outbox
can let go). Rollouts are the pure state machine of ``fleet.rollout``, stepped on every tick and
whenever something is ingested; its actions become retained ``desired`` messages. Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fleet import rollout as ro
from fleet.artifact_server import ArtifactCatalog
from fleet.model_store import artifact_url
from fleet.mqtt import ConnectInfo, Message, MqttClient, MqttError, MqttSettings
from fleet.protocol import (
    DEFAULT_PREFIX,
    Ack,
    ControllerState,
    DesiredState,
    Event,
    EventPhase,
    NodeState,
    ProtocolError,
    ReportedState,
    StateDecision,
    Telemetry,
    TopicKind,
    Topics,
    state_decision,
)
from fleet.store import ReleaseRecord, Store, TelemetrySample
from quantize.manifest import Manifest

log = logging.getLogger(__name__)


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    controller_id: str = Field(default="controller", description="this controller instance")
    prefix: str = Field(default=DEFAULT_PREFIX, description="MQTT topic prefix")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="the broker")
    artifact_base_url: str = Field(description="where nodes fetch artifacts this controller serves")
    # One second: bake windows and node timeouts are minutes; a tick costs a few SQL reads.
    tick_s: float = Field(default=1.0, gt=0, description="how often running rollouts are stepped")


@dataclass
class Controller:
    config: ControllerConfig
    store: Store
    catalog: ArtifactCatalog
    clock: Callable[[], float] = time.time
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.topics = Topics(self.config.prefix)
        self._bd_seq = 0
        self._wake = asyncio.Event()
        self.changed = asyncio.Event()  # set after every ingest and step (tests and the status page wait on it)
        self.mqtt = MqttClient(
            self.config.mqtt, f"controller-{self.config.controller_id}", will=self._will, on_connect=self._on_connect
        )

    # --- releases and rollouts -----------------------------------------------------------------

    def publish_release(self, name: str, directories: list[Path]) -> ReleaseRecord:
        """Verify each artifact, serve it, and register the release (blocking: hashes every file).

        The store records where each artifact lies (a ``file://`` URL), so a restarted controller
        serves its releases again (``restore_catalog``)."""
        manifests: list[Manifest] = [self.catalog.add(directory) for directory in directories]
        where = {m.variant_name: Path(d).resolve().as_uri() for m, d in zip(manifests, directories, strict=True)}
        return self.store.add_release(name, manifests, where)

    def restore_catalog(self) -> int:
        """Serve the artifacts of every registered release again (after a restart); returns how many."""
        count = 0
        for release in self.store.list_releases():
            for variant in release.variants:
                if variant.url and variant.url.startswith("file://"):
                    self.catalog.add(Path(variant.url.removeprefix("file://")))
                    count += 1
        return count

    def targets(
        self, release: ReleaseRecord, pinned: dict[str, str] | None = None
    ) -> dict[str, ro.Target | ro.NoTarget]:
        """Each node's variant of ``release``: the planner's best fit for its reported device."""
        variants = [v.release_variant() for v in release.variants]
        chosen: dict[str, ro.Target | ro.NoTarget] = {}
        for node in self.store.list_nodes():
            if node.facts is None:
                chosen[node.id] = ro.NoTarget("the node has not reported its device")
                continue
            choice = ro.choose_variant(node.facts, variants, pinned=(pinned or {}).get(node.id))
            record = release.variant(choice.variant) if choice.variant else None
            chosen[node.id] = (
                ro.Target(record.variant, record.artifact_id) if record else ro.NoTarget(choice.explanation)
            )
        return chosen

    def create_rollout(self, spec: ro.RolloutSpec, pinned: dict[str, str] | None = None) -> ro.RolloutState:
        release = self.store.get_release(spec.release)
        if release is None:
            raise ValueError(f"no release {spec.release!r}")
        state = ro.start(f"ro-{uuid.uuid4().hex[:8]}", spec, self._observations(), self.targets(release, pinned),
                         self.clock())  # fmt: skip
        self.store.save_rollout(state)
        self._wake.set()
        return state

    async def control(self, rollout_id: str, verb: str) -> ro.RolloutState:
        """``pause``, ``resume`` or ``abort`` a rollout (abort tells touched nodes to roll back)."""
        state = self.store.load_rollout(rollout_id)
        if state is None:
            raise KeyError(rollout_id)
        now = self.clock()
        if verb == "pause":
            state = ro.pause(state, now)
        elif verb == "resume":
            state = ro.resume(state, now)
        elif verb == "abort":
            decision = ro.abort(state, now)
            for action in decision.actions:
                await self._carry_out(decision.state, action)
            state = decision.state
        else:
            raise ValueError(f"unknown rollout action {verb!r}")
        self.store.save_rollout(state)
        self._wake.set()
        return state

    def _observations(self) -> dict[str, ro.NodeObservation]:
        observed = {}
        for node in self.store.list_nodes():
            sample = self.store.latest_telemetry(node.id)
            telemetry = None
            if sample is not None and sample.payload.get("agent"):
                agent = sample.payload["agent"]
                telemetry = ro.Telemetry(at=sample.received_at, error_rate=agent["error_rate"],
                                         p95_ms=agent["latency_p95_ms"])  # fmt: skip
            observed[node.id] = node.observation(telemetry)
        return observed

    async def step_rollouts(self) -> None:
        for state in self.store.list_rollouts(statuses=ro.ACTIVE):
            decision = ro.step(state, self._observations(), self.clock())
            for action in decision.actions:
                await self._carry_out(decision.state, action)
            self.store.save_rollout(decision.state)
        self.changed.set()

    async def _carry_out(self, state: ro.RolloutState, action: ro.Action) -> None:
        if isinstance(action, ro.SetDesired):
            await self._desire(action.node, action.generation, action.release, action.artifact)
        elif isinstance(action, ro.Rollback):
            if action.artifact is None:
                log.warning("rollback_to_nothing", extra={"event": "rollback_to_nothing", "node": action.node})
                return
            await self._desire(action.node, action.generation, state.spec.release, action.artifact)
        else:
            log.info("rollout_done", extra={"event": "rollout_done", "rollout": state.id, "status": state.status})

    async def _desire(self, node: str, generation: int, release: str, artifact_id: str) -> None:
        url = artifact_url(self.config.artifact_base_url, artifact_id)
        entry = self.catalog.entries.get(artifact_id)
        if entry is not None:
            desired = DesiredState.for_manifest(
                node, generation=generation, release=release, manifest=entry[1], url=url, ts=self.clock()
            )
        else:
            # A rollback to what the node ran before this controller knew it (e.g. the model it was
            # deployed with): the node has it and swaps back without downloading anything.
            desired = DesiredState(
                node=node, generation=generation, release=release, variant="previous", artifact_id=artifact_id,
                url=url, bytes=0, ts=self.clock(),
            )  # fmt: skip
        self.store.record_desired(node, generation, artifact_id)
        await self.mqtt.publish(*self.topics.outgoing(desired))

    # --- MQTT ------------------------------------------------------------------------------------

    def _state(self, online: bool, bd_seq: int) -> Message:
        state = ControllerState(controller=self.config.controller_id, online=online, bd_seq=bd_seq, ts=self.clock())
        return Message(*self.topics.outgoing(state))

    def _will(self, attempt: int) -> Message:
        return self._state(False, attempt)

    async def _on_connect(self, info: ConnectInfo) -> None:
        self._bd_seq = info.attempt
        await self.mqtt.publish_message(self._state(True, info.attempt))

    async def run(self, stop: asyncio.Event) -> None:
        await self.mqtt.start()
        await self.mqtt.subscribe(
            [(self.topics.all_nodes(kind), 1) for kind in
             (TopicKind.STATE, TopicKind.REPORTED, TopicKind.TELEMETRY, TopicKind.EVENTS)]
        )  # fmt: skip
        tasks = [
            asyncio.create_task(self._receive(), name="controller-receive"),
            asyncio.create_task(self._tick(), name="controller-tick"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.mqtt.close(death=self._state(False, self._bd_seq))

    async def _tick(self) -> None:
        while True:
            # A timeout is the tick itself: bake windows and node timeouts end without any message.
            # asyncio.timeout, not wait_for: on 3.11 a cancel that lands as wait_for times out comes
            # out as TimeoutError, which this loop would swallow and never stop (seen at shutdown).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()
            self._wake.clear()
            await self.step_rollouts()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.store.count_drop("mqtt", reason)

    async def _receive(self) -> None:
        async for message in self.mqtt.messages():
            try:
                decoded = self.topics.decode(message.topic, message.payload)
            except ProtocolError as exc:
                self._drop(exc.reason)
                continue
            await self.ingest(decoded.model)
            self._wake.set()

    async def ingest(self, model: object) -> None:
        """Store what a node said (SQL, in a thread: never on the loop); publish its new ack watermark."""
        ack = await asyncio.to_thread(self._store, model)
        if ack is not None:
            try:
                await self.mqtt.publish(*self.topics.outgoing(ack))
            except MqttError as exc:
                self._drop(f"ack_{exc.reason}")
        self.changed.set()

    def _store(self, model: object) -> Ack | None:
        """Record one message; for telemetry and events, the ack to publish when the watermark moved."""
        if isinstance(model, NodeState):
            current = self.store.get_node(model.node)
            decision = state_decision(current.bd_seq if current else None, model)
            if decision is StateDecision.BIRTH:
                self.store.record_birth(model.node, model.bd_seq)
            elif decision is StateDecision.DEATH:
                self.store.record_death(model.node, model.bd_seq)
            else:
                self._drop("late_will")
        elif isinstance(model, ReportedState):
            self.store.record_reported(
                model.node, generation=model.generation, artifact=model.running.artifact_id if model.running else None,
                ready=model.health.ready, health=model.health.reason, error=model.last_error,
                facts=model.device.to_facts() if model.device else None, labels=model.labels,
            )  # fmt: skip
        elif isinstance(model, Telemetry | Event):
            kind = "telemetry" if isinstance(model, Telemetry) else "events"
            sample = TelemetrySample(model.node, model.seq, model.model_dump(mode="json"), kind)
            self.store.record_telemetry([sample])
            if isinstance(model, Event) and model.phase is EventPhase.FAILED and model.generation:
                self.store.record_failure(model.node, model.generation, model.message)
            if isinstance(model, Event) and model.dropped_first is not None and model.dropped_last is not None:
                self.store.record_gap(model.node, model.dropped_first, model.dropped_last)
            before = self.store.ack_watermark(model.node)
            after = self.store.advance_ack(model.node)
            if after > before:
                return Ack(node=model.node, seq=after)
        return None
