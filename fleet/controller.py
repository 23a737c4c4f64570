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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.exc import DBAPIError

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
    Telemetry,
    TopicKind,
    Topics,
)
from fleet.store import Failure, Gap, Ingested, ReleaseRecord, Report, StateChange, Store, TelemetrySample
from quantize.manifest import SIGNATURE_NAME, Manifest, verify_artifact
from zimage_edge.device import DeviceFacts
from zimage_edge.errors import ZimageEdgeError

log = logging.getLogger(__name__)
# After a batch the database refused: a pause before the next, so that a database that is down is not
# asked thousands of times a second.
INGEST_RETRY_S = 0.5


# The lease whose holder drives the rollouts (one replica at a time).
ROLLOUT_LEASE = "rollouts"
# The topic kind of each message a controller ingests (the label of its ingest counter).
_KINDS: dict[type, str] = {NodeState: "state", ReportedState: "reported", Telemetry: "telemetry", Event: "events"}


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    controller_id: str = Field(default="controller", description="this controller instance")
    prefix: str = Field(default=DEFAULT_PREFIX, description="MQTT topic prefix")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="the broker")
    artifact_base_url: str = Field(description="where nodes fetch artifacts this controller serves")
    # One second: bake windows and node timeouts are minutes; a tick costs a few SQL reads.
    tick_s: float = Field(default=1.0, gt=0, description="how often running rollouts are stepped")
    # While nodes report, a step could follow every ingested batch; each reads every node. A quarter
    # second between steps bounds that work and adds little to a rollout whose waves bake for minutes.
    min_step_interval_s: float = Field(default=0.25, ge=0, description="least time between two rollout steps")
    # A batch is one transaction (one fsync): a second of telemetry from a thousand nodes fits in one.
    ingest_batch: int = Field(default=2000, ge=1, description="most messages stored in one transaction")
    replica_group: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="replicas sharing the ingest: the MQTT shared-subscription group (None: one controller)",
    )  # fmt: skip
    # Fifteen seconds: a dead leader's rollouts wait at most this long for another replica, which is
    # nothing next to bake windows of minutes, and a leader renews it every tick, many times over.
    lease_ttl_s: float = Field(default=15.0, gt=0, description="how long the rollout lease lasts unrenewed")

    @model_validator(mode="after")
    def _lease_outlives_ticks(self) -> ControllerConfig:
        if self.lease_ttl_s < 3 * self.tick_s:
            raise ValueError("lease_ttl_s must be at least three ticks (tick_s), or the leader would lose it")
        return self

    def mqtt_session(self) -> MqttSettings:
        """The broker settings this controller connects with: a replica starts a clean session each time."""
        if self.replica_group is None:
            return self.mqtt
        return self.mqtt.model_copy(update={"clean_start": True, "session_expiry_s": 0})


@dataclass
class Controller:
    config: ControllerConfig
    store: Store
    catalog: ArtifactCatalog
    clock: Callable[[], float] = time.time
    # Public keys a published artifact's signature must verify against (none: signatures not checked
    # here, only required to be present; the nodes check them against theirs).
    trusted_keys: list[Ed25519PublicKey] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    # Since this process started: messages ingested by topic kind, and redelivered samples (stored once).
    ingested: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    ingest_failures: int = 0  # batches the database refused (see ``_receive``)
    tick_failures: int = 0  # ticks (lease, rollout steps) the database refused (see ``_tick``)

    def __post_init__(self) -> None:
        self.topics = Topics(self.config.prefix)
        self._bd_seq = 0
        self._wake = asyncio.Event()
        # One writer of rollout states at a time: a step, an operator's pause/resume/abort, a new rollout.
        self._rollout_lock = asyncio.Lock()
        self.changed = asyncio.Event()  # set after every ingest and step (tests and the status page wait on it)
        self.subscribed = asyncio.Event()  # the broker has confirmed this controller's subscriptions
        self._lease_renewed_at: float | None = None
        self._releases_seen = -1
        # Ack watermarks stored but not published yet (node -> seq), and the publisher's wake-up.
        self._acks_due: dict[str, int] = {}
        self._acks_ready = asyncio.Event()
        self.mqtt = MqttClient(
            self.config.mqtt_session(), f"controller-{self.config.controller_id}", will=self._will,
            on_connect=self._on_connect,
        )  # fmt: skip

    # --- releases and rollouts -----------------------------------------------------------------

    def publish_release(self, name: str, directories: list[Path], *, allow_unsigned: bool = False) -> ReleaseRecord:
        """Verify each artifact, serve it, and register the release (blocking: hashes every file).

        An artifact must be signed (``manifest.sig``) unless ``allow_unsigned``; with trusted keys
        configured its signature must verify against one of them. Nodes verify again against their own
        keys. The store records where each artifact lies (a ``file://`` URL), so a restarted controller
        serves its releases again (``restore_catalog``). Nothing is registered unless all pass."""
        signed = {Path(d): (Path(d) / SIGNATURE_NAME).is_file() for d in directories}
        unsigned = [str(d) for d, is_signed in signed.items() if not is_signed]
        if unsigned and not allow_unsigned:
            raise ValueError(
                f"not signed ({SIGNATURE_NAME} missing): {', '.join(unsigned)}; sign with "
                "`zimage-edge quantize --sign-key`, or publish with --allow-unsigned"
            )
        # A signature present is always checked against the trusted keys; an unsigned artifact the
        # operator let through is checked for its hashes only.
        manifests: list[Manifest] = [
            verify_artifact(Path(d), (self.trusted_keys or None) if signed[Path(d)] else None)[0] for d in directories
        ]
        where = {m.variant_name: Path(d).resolve().as_uri() for m, d in zip(manifests, directories, strict=True)}
        release = self.store.add_release(name, manifests, where)
        for directory, manifest in zip(directories, manifests, strict=True):
            self.catalog.add_verified(Path(directory), manifest)
        return release

    def restore_catalog(self) -> int:
        """Serve the artifacts of every registered release again (after a restart); returns how many."""
        count = 0
        for release in self.store.list_releases():
            for variant in release.variants:
                known = variant.artifact_id in self.catalog.entries
                if known or not variant.url or not variant.url.startswith("file://"):
                    continue
                try:
                    self.catalog.add(Path(variant.url.removeprefix("file://")))
                except (ZimageEdgeError, OSError) as exc:  # moved, damaged, or not on this replica's volume
                    log.warning("artifact_unavailable", extra={"event": "artifact_unavailable",
                                "artifact": variant.artifact_id, "error": str(exc)})  # fmt: skip
                    continue
                count += 1
        return count

    def targets(
        self, release: ReleaseRecord, pinned: dict[str, str] | None = None
    ) -> dict[str, ro.Target | ro.NoTarget]:
        """Each node's variant of ``release``: the planner's best fit for its reported device."""
        chosen: dict[str, ro.Target | ro.NoTarget] = {}
        for node, choice in self.choices(release, pinned).items():
            record = release.variant(choice.variant) if choice and choice.variant else None
            if record is not None:
                chosen[node] = ro.Target(record.variant, record.artifact_id)
            else:
                chosen[node] = ro.NoTarget(choice.explanation if choice else "the node has not reported its device")
        return chosen

    def choices(
        self, release: ReleaseRecord, pinned: dict[str, str] | None = None
    ) -> dict[str, ro.VariantChoice | None]:
        """The planner's choice for each node (None: no device reported). A fleet has a few device
        kinds and many nodes: the planner runs once per distinct device and pin, not once per node."""
        variants = [v.release_variant() for v in release.variants]
        memo: dict[tuple[DeviceFacts, str | None], ro.VariantChoice] = {}
        chosen: dict[str, ro.VariantChoice | None] = {}
        for node in self.store.list_nodes():
            if node.facts is None:
                chosen[node.id] = None
                continue
            key = (node.facts, (pinned or {}).get(node.id))
            if key not in memo:
                memo[key] = ro.choose_variant(node.facts, variants, pinned=key[1])
            chosen[node.id] = memo[key]
        return chosen

    async def create_rollout(self, spec: ro.RolloutSpec, pinned: dict[str, str] | None = None) -> ro.RolloutState:
        """Start rolling a release out (planning runs in a thread: a thousand nodes take a while)."""
        async with self._rollout_lock:
            state = await asyncio.to_thread(self._new_rollout, spec, pinned)
        self._wake.set()
        return state

    def _new_rollout(self, spec: ro.RolloutSpec, pinned: dict[str, str] | None) -> ro.RolloutState:
        release = self.store.get_release(spec.release)
        if release is None:
            raise ValueError(f"no release {spec.release!r}")
        state = ro.start(f"ro-{uuid.uuid4().hex[:8]}", spec, self._observations(), self.targets(release, pinned),
                         self.clock())  # fmt: skip
        self.store.save_rollout(state)
        return state

    async def control(self, rollout_id: str, verb: str) -> ro.RolloutState:
        """``pause``, ``resume`` or ``abort`` a rollout (abort tells touched nodes to roll back)."""
        async with self._rollout_lock:
            return await self._control(rollout_id, verb)

    async def _control(self, rollout_id: str, verb: str) -> ro.RolloutState:
        state = await asyncio.to_thread(self.store.load_rollout, rollout_id)
        if state is None:
            raise KeyError(rollout_id)
        now = self.clock()
        if verb == "pause":
            state = ro.pause(state, now)
        elif verb == "resume":
            state = ro.resume(state, now)
        elif verb == "abort":
            decision = ro.abort(state, now)
            await self._carry_out(decision.state, decision.actions)
            state = decision.state
        else:
            raise ValueError(f"unknown rollout action {verb!r}")
        await asyncio.to_thread(self.store.save_rollout, state)
        self._wake.set()
        return state

    def _observations(self) -> dict[str, ro.NodeObservation]:
        return {node.id: node.observation() for node in self.store.list_nodes()}

    async def step_rollouts(self) -> None:
        async with self._rollout_lock:
            await self._step_rollouts()

    async def _step_rollouts(self) -> None:
        states = await asyncio.to_thread(self.store.list_rollouts, statuses=ro.ACTIVE)
        observations = await asyncio.to_thread(self._observations) if states else {}
        for state in states:
            decision = ro.step(state, observations, self.clock())
            await self._carry_out(decision.state, decision.actions)
            if decision.state != state:
                await asyncio.to_thread(self.store.save_rollout, decision.state)
        self.changed.set()

    async def _carry_out(self, state: ro.RolloutState, actions: Sequence[ro.Action]) -> None:
        """Carry out one decision's actions: every ``desired`` recorded in one transaction, then published
        at once (a wave may tell a hundred nodes; one PUBACK round trip after another would take seconds)."""
        desires: list[DesiredState] = []
        for action in actions:
            if isinstance(action, ro.SetDesired):
                desires.append(self._desired(action.node, action.generation, action.release, action.artifact))
            elif isinstance(action, ro.Rollback):
                if action.artifact is None:
                    log.warning("rollback_to_nothing", extra={"event": "rollback_to_nothing", "node": action.node})
                    continue
                desires.append(self._desired(action.node, action.generation, state.spec.release, action.artifact))
            else:
                log.info("rollout_done", extra={"event": "rollout_done", "rollout": state.id, "status": state.status})
        if not desires:
            return
        await asyncio.to_thread(
            self.store.record_desired_many, [(d.node, d.generation, d.artifact_id) for d in desires]
        )
        await asyncio.gather(*(self.mqtt.publish(*self.topics.outgoing(desired)) for desired in desires))

    def _desired(self, node: str, generation: int, release: str, artifact_id: str) -> DesiredState:
        url = artifact_url(self.config.artifact_base_url, artifact_id)
        entry = self.catalog.entries.get(artifact_id)
        if entry is not None:
            return DesiredState.for_manifest(
                node, generation=generation, release=release, manifest=entry[1], url=url, ts=self.clock()
            )
        # A rollback to what the node ran before this controller knew it (e.g. the model it was deployed
        # with): the node has it and swaps back without downloading anything.
        return DesiredState(
            node=node, generation=generation, release=release, variant="previous", artifact_id=artifact_id,
            url=url, bytes=0, ts=self.clock(),
        )  # fmt: skip

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
        tasks = [
            asyncio.create_task(self._receive(), name="controller-receive"),
            asyncio.create_task(self._tick(), name="controller-tick"),
            asyncio.create_task(self._publish_acks(), name="controller-acks"),
        ]
        try:
            await self.mqtt.subscribe(self.subscriptions())
            self.subscribed.set()
            stopping = asyncio.create_task(stop.wait(), name="controller-stop")
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done - {stopping}:
                # The ingest, the tick or the acks ended on its own: an error nobody handled. It stops
                # the controller (its supervisor starts it again) rather than run on without it.
                task.result()
                raise RuntimeError(f"{task.get_name()} ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.leader:  # a clean stop hands the rollouts over at once
                await asyncio.to_thread(self.store.release_lease, ROLLOUT_LEASE, self.config.controller_id)
                self._lease_renewed_at = None
            await self.mqtt.close(death=self._state(False, self._bd_seq))

    def subscriptions(self) -> list[tuple[str, int]]:
        """What this controller reads. Replicas share telemetry and events (the bulk) through an MQTT v5
        shared subscription, which the broker deals out between them; each reads every ``state`` and
        ``reported`` itself (few, and retained: a shared subscription gets no retained messages, and a
        replica that starts must learn every node's state). Writes are idempotent either way."""
        group = self.config.replica_group
        shared = {TopicKind.TELEMETRY, TopicKind.EVENTS}
        filters = []
        for kind in (TopicKind.STATE, TopicKind.REPORTED, TopicKind.TELEMETRY, TopicKind.EVENTS):
            topic = self.topics.all_nodes(kind)
            filters.append((f"$share/{group}/{topic}" if group and kind in shared else topic, 1))
        return filters

    async def _tick(self) -> None:
        while True:
            # A timeout is the tick itself: bake windows and node timeouts end without any message.
            # asyncio.timeout, not wait_for: on 3.11 a cancel that lands as wait_for times out comes
            # out as TimeoutError, which this loop would swallow and never stop (seen at shutdown).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()
            # Wakes that come during the pause are served by the step after it (the event stays set).
            await asyncio.sleep(self.config.min_step_interval_s)
            self._wake.clear()
            try:
                await self._hold_lease()
                await self._serve_new_releases()
                if self.leader:
                    await self.step_rollouts()
                else:
                    self.changed.set()
            except DBAPIError as exc:
                # The database is busy or away: this tick is skipped, the next one asks again. A lease
                # that cannot be renewed lapses by this controller's own clock (``leader``), so no step
                # runs on a lease another replica may have taken meanwhile.
                self.tick_failures += 1
                log.error("tick failed", extra={"event": "tick_failed", "error": str(exc.orig or exc)})

    @property
    def leader(self) -> bool:
        """Holds the rollout lease now, by its own clock: from before it asked for the lease until a lease
        time later, which ends no later than the lease in the database (set after it asked), so a
        replica that stalls stops counting itself leader before another can take over."""
        renewed = self._lease_renewed_at
        return renewed is not None and self.clock() < renewed + self.config.lease_ttl_s

    async def _hold_lease(self) -> None:
        """Take or renew the rollout lease: renewed once a third of it has passed (not on every wake)."""
        now = self.clock()
        was_leader, renewed = self.leader, self._lease_renewed_at
        if was_leader and renewed is not None and now - renewed < self.config.lease_ttl_s / 3:
            return
        leader = await asyncio.to_thread(
            self.store.acquire_lease, ROLLOUT_LEASE, self.config.controller_id, self.config.lease_ttl_s
        )
        self._lease_renewed_at = now if leader else None
        if leader != was_leader:
            log.info("lease", extra={"event": "lease_taken" if leader else "lease_lost",
                                     "controller": self.config.controller_id})  # fmt: skip

    async def _serve_new_releases(self) -> None:
        """Serve the artifacts of releases another replica published (they lie on a shared volume)."""
        count = await asyncio.to_thread(self.store.release_count)
        if count != self._releases_seen:
            await asyncio.to_thread(self.restore_catalog)
            self._releases_seen = count

    async def _receive(self) -> None:
        async for batch in self.mqtt.batches(self.config.ingest_batch):
            models, drops = [], Counter[str]()
            for message in batch:
                try:
                    models.append(self.topics.decode(message.topic, message.payload).model)
                except ProtocolError as exc:
                    drops[exc.reason] += 1
            try:
                await self.ingest(models, drops)
            except DBAPIError as exc:
                # The database refused the batch (down, full, a failover): nothing of it was stored, so no
                # ack moved, and each node sends its unacknowledged telemetry again (``resend_after_s``);
                # births and reports come again with the node's next connection or report. The ingest
                # goes on with the next batch rather than die.
                self.ingest_failures += 1
                log.error("ingest failed", extra={"event": "ingest_failed", "messages": len(batch),
                                                  "error": str(exc.orig or exc)})  # fmt: skip
                await asyncio.sleep(INGEST_RETRY_S)

    async def ingest(self, models: Sequence[object], drops: Counter[str] | None = None) -> None:
        """Store a batch of what nodes said (SQL, in a thread: never on the loop); hand the ack
        watermarks that moved to the ack publisher; step rollouts if a node's state changed."""
        ingested, wake = await asyncio.to_thread(self._store_batch, models, drops or Counter())
        self.duplicates += ingested.duplicates
        for node, seq in ingested.acks.items():
            self._acks_due[node] = max(seq, self._acks_due.get(node, 0))
        if ingested.acks:
            self._acks_ready.set()
        if wake:
            self._wake.set()  # telemetry alone waits for the tick: gates judge it over bake windows
        self.changed.set()

    async def _publish_acks(self) -> None:
        """Publish the ack watermarks that moved, apart from the ingest: the next batch is stored while
        these wait for their PUBACKs, which come on the same connection behind whatever the broker is
        sending this controller (under load, seconds of telemetry). Watermarks that moved again before
        they went out are sent once, the highest: an ack per node per round, however far behind."""
        while True:
            await self._acks_ready.wait()
            self._acks_ready.clear()
            due, self._acks_due = self._acks_due, {}
            acks = [Ack(node=node, seq=seq) for node, seq in due.items()]
            results = await asyncio.gather(
                *(self.mqtt.publish(*self.topics.outgoing(ack)) for ack in acks), return_exceptions=True
            )
            for result in results:
                if isinstance(result, MqttError):
                    await asyncio.to_thread(self._drop, f"ack_{result.reason}")
                elif isinstance(result, BaseException):
                    raise result

    def _drop(self, reason: str, count: int = 1) -> None:
        """Count messages dropped (blocking: SQL)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        self.store.count_drop("mqtt", reason, count)

    def _store_batch(self, models: Sequence[object], drops: Counter[str]) -> tuple[Ingested, bool]:
        """Record one batch (in the ingest thread, one transaction); returns what the outbox messages did,
        and whether a node's state changed (a rollout may move)."""
        for reason, count in drops.items():
            self._drop(reason, count)
        changes: list[StateChange | Report] = []
        samples: list[TelemetrySample] = []
        gaps: list[Gap] = []
        failures: list[Failure] = []
        wake = False
        for model in models:
            self.ingested[_KINDS.get(type(model), "other")] += 1
            if isinstance(model, NodeState):
                changes.append(StateChange(model.node, model.bd_seq, model.online))
            elif isinstance(model, ReportedState):
                changes.append(Report(
                    model.node, generation=model.generation,
                    artifact=model.running.artifact_id if model.running else None, ready=model.health.ready,
                    health=model.health.reason, error=model.last_error,
                    facts=model.device.to_facts() if model.device else None, labels=model.labels,
                ))  # fmt: skip
            elif isinstance(model, Telemetry | Event):
                kind = "telemetry" if isinstance(model, Telemetry) else "events"
                samples.append(TelemetrySample(model.node, model.seq, model.model_dump(mode="json"), kind))
                if isinstance(model, Event):
                    wake = True
                    if model.phase is EventPhase.FAILED and model.generation:
                        failures.append(Failure(model.node, model.generation, model.message))
                    if model.dropped_first is not None and model.dropped_last is not None:
                        gaps.append(Gap(model.node, model.dropped_first, model.dropped_last))
        if not (changes or samples or gaps or failures):
            return Ingested(new=0, duplicates=0, acks={}), wake
        ingested = self.store.ingest(samples, gaps, failures, changes=changes)
        if ingested.late_wills:
            self._drop("late_will", ingested.late_wills)
        # A late will changes nothing; every other birth, death or report may move a rollout.
        return ingested, wake or len(changes) > ingested.late_wills
