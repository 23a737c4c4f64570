"""The node sidecar: follows its ``desired`` state, installs artifacts, swaps its agent, reports.

Runs beside the agent (a sidecar container) and talks to it only over HTTP. One MQTT connection with a
persistent session; on every connect a birth with a growing ``bd_seq`` (the will carries the same
one), then the node's ``reported`` state. A ``desired`` with a newer generation is applied in order:
free disk, download with resume, verify (hashes, signature), install by rename, ask the agent to
swap, wait for ready, check the agent runs exactly that artifact, report — any failure leaves the
agent serving what it had and says why in ``events`` and ``reported.last_error``. Telemetry and
events go through the on-disk outbox and leave it only when the controller's ack passes them.
Torch-free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from fleet.agent_client import AgentClient, AgentError
from fleet.model_store import DownloadError, ModelStore
from fleet.mqtt import ConnectInfo, Message, MqttClient, MqttError, MqttSettings
from fleet.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, Outbox
from fleet.protocol import (
    DEFAULT_PREFIX,
    Ack,
    DesiredState,
    DeviceFactsModel,
    Event,
    EventKind,
    EventPhase,
    NodeState,
    ProtocolError,
    ReportedState,
    Telemetry,
    TopicKind,
    Topics,
    encode,
    validate_node_id,
)
from fleet.telemetry import AgentWatch, parse_metrics, system_stats
from quantize.signing import load_public_keys
from zimage_edge.device import DeviceFacts

log = logging.getLogger(__name__)

# An agent that is not ready this long after a swap has failed it (a real model loads in minutes).
READY_TIMEOUT_S = 900.0
# At most this many outbox rows go out per flush; the rest follow on the next one.
FLUSH_BATCH = 500


class NodeConfig(BaseModel):
    """Everything the sidecar is told (the CLI's settings layer reads files and the environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str = Field(description="this node's id: one MQTT topic level, and its broker user name")
    prefix: str = Field(default=DEFAULT_PREFIX, description="MQTT topic prefix")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="the broker")
    agent_url: str = Field(default="http://127.0.0.1:8188", description="the agent beside this sidecar")
    agent_key: SecretStr | None = Field(default=None, description="an admin key of the agent (swaps, /metrics)")
    store_dir: Path = Field(description="the model store (artifacts, partial downloads, the outbox)")
    keep_versions: int = Field(default=3, ge=2, description="installed artifacts kept for instant rollback")
    telemetry_interval_s: float = Field(default=10.0, gt=0, description="seconds between telemetry messages")
    bandwidth_bytes_per_s: float | None = Field(default=None, gt=0, description="download cap (none: no cap)")
    trusted_keys: list[Path] = Field(default_factory=list, description="public keys artifacts must be signed by")
    labels: dict[str, str] = Field(default_factory=dict, description="labels for rollout selectors (site, class)")
    outbox_max_rows: int = Field(default=DEFAULT_MAX_ROWS, ge=1, description="outbox bound in messages")
    outbox_max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1024, description="outbox bound in bytes")
    # A controller (replica) that dies between taking a message from the broker and storing it leaves a
    # hole the ack watermark cannot pass, and the broker will not deliver that message again: sent
    # messages unacknowledged this long, with no ack progress meanwhile, go again (stored once anyway).
    # A minute: acks normally follow within a second, even at a thousand nodes.
    resend_after_s: float = Field(default=60.0, gt=0, description="send unacknowledged messages again after")


@dataclass
class NodeMemory:
    """What the node keeps across restarts (beside the store): its bd_seq and the generation applied."""

    path: Path
    bd_seq: int = 0
    generation: int = 0

    @classmethod
    def load(cls, path: Path) -> NodeMemory:
        if path.is_file():
            data = json.loads(path.read_text())
            return cls(path, int(data["bd_seq"]), int(data["generation"]))
        return cls(path)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bd_seq": self.bd_seq, "generation": self.generation}))
        tmp.replace(self.path)  # atomic: a crash leaves the old file or the new one


@dataclass
class Node:
    config: NodeConfig
    facts: DeviceFacts | None = None  # the device this node reports (a simulated profile in the demo)
    clock: Callable[[], float] = time.time
    last_error: str | None = None
    failed_generation: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_node_id(self.config.node_id)
        self.topics = Topics(self.config.prefix)
        self.store = ModelStore(self.config.store_dir)
        self.outbox = Outbox(
            self.config.store_dir / "outbox.db", self.config.outbox_max_rows, self.config.outbox_max_bytes
        )
        self.memory = NodeMemory.load(self.config.store_dir / "node.json")
        self._base_bd_seq = self.memory.bd_seq
        self._current_bd_seq = self.memory.bd_seq
        self._desired: DesiredState | None = None
        self._wake_apply = asyncio.Event()
        self._wake_flush = asyncio.Event()
        self._watch = AgentWatch()
        # Outbox rows published on this connection: a flush sends only newer ones; after a reconnect
        # everything not yet acknowledged goes again (the controller stores each seq once).
        self._sent_upto = 0
        self._waiting_since: float | None = None  # when sent messages began waiting for an ack (monotonic)
        # Models the agent has served, by artifact_id: a rollback to one of them needs no download
        # (the model it started with may be a plain directory no controller serves).
        self._served: dict[str, str] = {}
        self._announced_drops = 0
        self.applied = asyncio.Event()  # set after each desired generation is applied or refused
        self.mqtt = MqttClient(
            self.config.mqtt, f"node-{self.config.node_id}", will=self._will, on_connect=self._on_connect
        )

    # --- MQTT ------------------------------------------------------------------------------------

    def _state(self, online: bool, bd_seq: int) -> Message:
        state = NodeState(node=self.config.node_id, online=online, bd_seq=bd_seq, ts=self.clock())
        return Message(*self.topics.outgoing(state))

    def _will(self, attempt: int) -> Message:
        # Each connect attempt has its own bd_seq; the will registered with it carries the same one.
        return self._state(False, self._base_bd_seq + attempt)

    async def _on_connect(self, info: ConnectInfo) -> None:
        self._current_bd_seq = self._base_bd_seq + info.attempt
        self.memory.bd_seq = self._current_bd_seq
        await asyncio.to_thread(self.memory.save)
        await self.mqtt.publish_message(self._state(True, self._current_bd_seq))
        await self._publish_reported()
        self._sent_upto = 0
        self._waiting_since = None  # everything goes again now; the wait starts with the flush
        self._wake_flush.set()

    async def _publish_reported(self) -> None:
        health = await self.agent.health()
        running = await self.agent.running()
        reported = ReportedState(
            node=self.config.node_id,
            generation=self.memory.generation,
            running=running,
            health=health,
            device=DeviceFactsModel.from_facts(self.facts) if self.facts else None,
            labels=self.config.labels,
            last_error=self.last_error,
            ts=self.clock(),
        )
        try:
            await self.mqtt.publish(*self.topics.outgoing(reported))
        except MqttError as exc:
            self._count(f"reported_{exc.reason}")

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # --- the loops ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then publish the death and disconnect."""
        key = self.config.agent_key.get_secret_value() if self.config.agent_key else None
        async with aiohttp.ClientSession() as session:
            self.session = session
            self.agent = AgentClient(session, self.config.agent_url.rstrip("/"), api_key=key)
            await self.mqtt.start()
            await self.mqtt.subscribe(
                [(self.topics.desired(self.config.node_id), 1), (self.topics.ack(self.config.node_id), 1),
                 (self.topics.state(self.config.node_id), 1)]
            )  # fmt: skip
            tasks = [
                asyncio.create_task(self._receive(), name=f"node-{self.config.node_id}-receive"),
                asyncio.create_task(self._apply_loop(), name=f"node-{self.config.node_id}-apply"),
                asyncio.create_task(self._telemetry_loop(), name=f"node-{self.config.node_id}-telemetry"),
                asyncio.create_task(self._flush_loop(), name=f"node-{self.config.node_id}-flush"),
            ]
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.mqtt.close(death=self._state(False, self._current_bd_seq))
                self.outbox.close()

    async def _receive(self) -> None:
        async for message in self.mqtt.messages():
            try:
                decoded = self.topics.decode(message.topic, message.payload)
            except ProtocolError as exc:
                self._count(f"dropped_{exc.reason}")
                continue
            if decoded.node_id != self.config.node_id:
                self._count("dropped_not_mine")
                continue
            model = decoded.model
            if decoded.kind is TopicKind.DESIRED and isinstance(model, DesiredState):
                if self._desired is None or model.generation > self._desired.generation:
                    self._desired = model
                    self._wake_apply.set()
            elif decoded.kind is TopicKind.ACK and isinstance(model, Ack):
                if await asyncio.to_thread(self.outbox.acknowledge, model.seq):
                    # Progress: whatever is still unacknowledged waits afresh (or nothing waits).
                    self._waiting_since = time.monotonic() if model.seq < self._sent_upto else None
            elif isinstance(model, NodeState) and not model.online and model.bd_seq != self._current_bd_seq:
                # A late will of an earlier connection replaced our retained birth: be born again.
                await self.mqtt.publish_message(self._state(True, self._current_bd_seq))

    async def _apply_loop(self) -> None:
        while True:
            await self._wake_apply.wait()
            self._wake_apply.clear()
            desired = self._desired
            if desired is None or desired.generation <= max(self.memory.generation, self.failed_generation):
                continue
            await self._apply(desired)
            self.applied.set()

    async def _telemetry_loop(self) -> None:
        while True:
            await self._telemetry_once()
            self._resend_if_stuck()
            await asyncio.sleep(self.config.telemetry_interval_s)

    def _resend_if_stuck(self) -> None:
        """Everything unacknowledged goes again if the acks have not moved for ``resend_after_s``."""
        since = self._waiting_since
        if since is not None and time.monotonic() - since >= self.config.resend_after_s:
            self._count("resent")
            self._sent_upto = 0
            self._waiting_since = time.monotonic()
            self._wake_flush.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake_flush.wait()
            self._wake_flush.clear()
            if self.mqtt.connected:
                await self._flush()

    # --- steps -------------------------------------------------------------------------------------

    async def _telemetry_once(self) -> None:
        text = await self.agent.metrics_text()
        agent_stats = self._watch.update(parse_metrics(text)) if text is not None else None
        system = await asyncio.to_thread(system_stats, self.config.store_dir)

        def build(seq: int) -> bytes:
            return encode(
                Telemetry(node=self.config.node_id, seq=seq, ts=self.clock(), system=system, agent=agent_stats)
            )

        await asyncio.to_thread(self.outbox.add, [("telemetry", build)])
        if self.outbox.dropped > self._announced_drops:
            self._announced_drops = self.outbox.dropped
            await asyncio.to_thread(self.outbox.announce_drops, self._drop_event)
        self._wake_flush.set()

    def _drop_event(self, seq: int, first: int, last: int) -> bytes:
        return encode(Event(
            node=self.config.node_id, seq=seq, ts=self.clock(), kind=EventKind.ERROR, phase=EventPhase.FAILED,
            message=f"telemetry {first}..{last} dropped: the outbox was full", reason="telemetry_dropped",
            dropped_first=first, dropped_last=last,
        ))  # fmt: skip

    async def _event(self, desired: DesiredState, kind: EventKind, phase: EventPhase, message: str,
                     reason: str | None = None) -> None:  # fmt: skip
        def build(seq: int) -> bytes:
            return encode(Event(
                node=self.config.node_id, seq=seq, ts=self.clock(), kind=kind, phase=phase, message=message[:1000],
                reason=reason, generation=desired.generation, artifact_id=desired.artifact_id,
            ))  # fmt: skip

        await asyncio.to_thread(self.outbox.add, [("events", build)])
        self._wake_flush.set()

    async def _flush(self) -> None:
        """Publish what the outbox holds, oldest first; stop at the first failure (the rest waits)."""
        rows = await asyncio.to_thread(self.outbox.pending, FLUSH_BATCH, self._sent_upto)
        for row in rows:
            kind = TopicKind.TELEMETRY if row.kind == "telemetry" else TopicKind.EVENTS
            try:
                await self.mqtt.publish(self.topics.node(kind, self.config.node_id), row.payload, qos=1)
            except MqttError as exc:
                self._count(f"flush_{exc.reason}")
                return
            self._sent_upto = row.seq
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()
        if len(rows) == FLUSH_BATCH:
            self._wake_flush.set()  # more is waiting

    async def _apply(self, desired: DesiredState) -> None:
        found = await self.agent.running_with_source()
        previous = found[0] if found else None
        if found:
            self._served[found[0].artifact_id] = found[1]
        try:
            if desired.artifact_id in self._served and not self.store.has(desired.artifact_id):
                path = Path(self._served[desired.artifact_id])  # back to what it ran before: no download
            else:
                await self._event(desired, EventKind.DOWNLOAD, EventPhase.STARTED, f"fetching {desired.variant}")
                trusted = load_public_keys(self.config.trusted_keys)
                path = await self.store.fetch(
                    self.session, desired.url, desired.artifact_id, trusted=trusted,
                    bytes_per_s=self.config.bandwidth_bytes_per_s,
                )  # fmt: skip
                await self._event(desired, EventKind.INSTALL, EventPhase.SUCCEEDED, f"verified, installed at {path}")
            await self._event(desired, EventKind.SWAP, EventPhase.STARTED, "asking the agent to swap")
            await self.agent.swap(str(path))
            health = await self.agent.wait_ready(READY_TIMEOUT_S)
            running = await self.agent.running()
            if not health.ready or running is None or running.artifact_id != desired.artifact_id:
                raise AgentError(0, f"the agent is not serving {desired.artifact_id[:10]} after the swap")
        except (DownloadError, AgentError) as exc:
            reason = exc.reason if isinstance(exc, DownloadError) else f"agent_{exc.status}"
            kind = EventKind.DOWNLOAD if isinstance(exc, DownloadError) else EventKind.SWAP
            self.last_error = f"generation {desired.generation}: {exc}"
            self.failed_generation = desired.generation
            log.warning("apply_failed", extra={"event": "apply_failed", "generation": desired.generation,
                                               "reason": reason})  # fmt: skip
            await self._event(desired, kind, EventPhase.FAILED, str(exc), reason=reason)
            await self._publish_reported()
            return
        self.memory.generation = desired.generation
        self.last_error = None
        await asyncio.to_thread(self.memory.save)
        protect = {desired.artifact_id} | ({previous.artifact_id} if previous else set())
        try:
            await asyncio.to_thread(self.store.prune, self.config.keep_versions, protect)
        except OSError as exc:  # pruning is housekeeping: it is tried again after the next install
            log.warning("prune_failed", extra={"event": "prune_failed", "error": str(exc)})
        await self._event(desired, EventKind.SWAP, EventPhase.SUCCEEDED, f"serving {desired.variant}")
        await self._publish_reported()
