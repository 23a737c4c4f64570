"""The fleet's MQTT contract: topic names and payload schemas, version 1.

Torch-free, and the only place topics and payloads are defined: the controller, the node sidecar,
the simulated nodes of the benchmark and the tests all import them from here.

Topics live under a configurable prefix (default ``zimage/v1``) with one node id per topic level, so
that a broker ACL pattern such as ``pattern write zimage/v1/nodes/%u/telemetry`` pins a node to its own
topics (``%u`` must fill a whole level)::

    PREFIX/nodes/NODE/state       retained   node        birth/death, Sparkplug style (bd_seq)
    PREFIX/nodes/NODE/desired     retained   controller  the artifact the node should run (generation)
    PREFIX/nodes/NODE/reported    retained   node        what it runs, its health, device facts, labels
    PREFIX/nodes/NODE/telemetry   QoS 1      node        metrics, one per-node ``seq``
    PREFIX/nodes/NODE/events      QoS 1      node        download/verify/install/swap progress, failures
    PREFIX/nodes/NODE/ack         retained   controller  the node's acknowledged ``seq`` watermark
    PREFIX/controller/state       retained   controller  the controller's own birth/death

Every payload is compact JSON with a schema version ``v``; every payload on a node topic names its node
again, and ``decode`` drops (raises ``ProtocolError`` with a machine-readable ``reason``) anything that
does not fit: the caller counts drops by reason and carries on.

Telemetry and events share one per-node sequence (``seq``): both leave the node through its on-disk
outbox in that order, and one ack watermark per node tells it which rows it may delete.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantize.identity import ModelIdentity
from quantize.manifest import Manifest
from zimage_edge.device import DeviceFacts, DeviceKind

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({SCHEMA_VERSION})
DEFAULT_PREFIX: Final = "zimage/v1"

# Node ids become one topic level, a broker user name (ACL ``%u``), a database key and a metric label.
# So: no MQTT wildcards (``+``, ``#``), no level separator (``/``), no leading ``$`` (reserved for the
# broker's ``$SYS`` topics), printable ASCII only. 128 characters hold any hostname-like name in
# practice (a DNS label is at most 63) while bounding topic, key and label sizes.
NODE_ID_MAX = 128
NODE_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
_NODE_ID_RE = re.compile(NODE_ID_PATTERN)

# ``quantize.manifest.artifact_id``: sha256 of the canonical manifest.json, as 64 lower-case hex digits.
ARTIFACT_ID_PATTERN: Final = r"^[0-9a-f]{64}$"
# ``seq``, ``bd_seq`` and ``generation`` are stored as SQL BIGINT, which is signed 64-bit.
INT64_MAX: Final = 2**63 - 1
# The largest legitimate payload (``reported`` with device facts and labels) is about 1 KiB; 64 KiB bounds
# what a buggy or hostile publisher can make the controller parse.
MAX_PAYLOAD_BYTES = 64 * 1024
# An event message is one line for an operator, not a log dump.
MAX_MESSAGE_CHARS = 2000
# Short identifiers (release names, variants, reasons, label keys and values, sensor names).
MAX_NAME_CHARS = 200
MAX_LABELS = 32

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
NodeId = Annotated[str, Field(min_length=1, max_length=NODE_ID_MAX, pattern=NODE_ID_PATTERN)]
ArtifactId = Annotated[str, Field(pattern=ARTIFACT_ID_PATTERN)]
Seq = Annotated[int, Field(ge=0, le=INT64_MAX)]
Timestamp = Annotated[float, Field(ge=0, description="Unix time in seconds, by the publisher's clock")]
Bytes = Annotated[int, Field(ge=0)]
Percent = Annotated[float, Field(ge=0, le=100)]


class ProtocolError(ValueError):
    """A message that does not fit the contract; ``reason`` is one of ``DROP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# Why ``decode`` drops a message: the label values of the drop counters.
DROP_REASONS: Final = (
    "unknown_topic",  # not under the prefix, an unknown kind, or an invalid node id level
    "empty",  # zero bytes: how MQTT clears a retained topic
    "too_large",  # over MAX_PAYLOAD_BYTES
    "malformed",  # not UTF-8 JSON, or not a JSON object
    "version",  # a schema version this build does not speak
    "schema",  # fails the payload model of its topic (including a payload meant for another topic)
    "node_mismatch",  # the payload's node differs from the topic's
)


def validate_node_id(node_id: str) -> str:
    """``node_id`` if it is safe as one topic level, ACL user name and key; ``ValueError`` otherwise."""
    if not (0 < len(node_id) <= NODE_ID_MAX) or not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError(
            f"invalid node id {node_id!r}: 1-{NODE_ID_MAX} characters of A-Z a-z 0-9 _ . : -, starting with a "
            "letter or digit"
        )
    return node_id


# ---------------------------------------------------------------------------------------------------
# Payloads


class _Payload(BaseModel):
    # strict: a "5" is not a generation; the publisher is a program, not a person.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1] = Field(default=SCHEMA_VERSION, description="schema version of this payload")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NodeState(_Payload):
    """Birth (``online``) or death of a node; the death is also registered as the node's last will."""

    node: NodeId
    online: bool
    bd_seq: Seq = Field(description="birth/death sequence: grows on every connect; a will carries its connect's")
    ts: Timestamp


class ControllerState(_Payload):
    """Birth or death of the controller (same rules as ``NodeState``)."""

    controller: Name = Field(description="the controller instance")
    online: bool
    bd_seq: Seq
    ts: Timestamp


class DesiredState(_Payload):
    """What the controller wants a node to run (shadow style: the highest generation wins)."""

    node: NodeId
    generation: Seq = Field(description="grows with every change of what this node should run")
    release: Name
    variant: Name
    artifact_id: ArtifactId
    url: str = Field(pattern=r"^https?://", max_length=2048, description="where the artifact directory is served")
    key_id: Name | None = Field(default=None, description="signing key the manifest must verify against")
    bytes: Bytes = Field(description="total bytes of the artifact's files (free disk needed)")
    ts: Timestamp

    @classmethod
    def for_manifest(
        cls,
        node: str,
        *,
        generation: int,
        release: str,
        manifest: Manifest,
        url: str,
        ts: float,
        key_id: str | None = None,
    ) -> DesiredState:
        """The desired state for an artifact, read from its manifest (its identity, variant and size)."""
        return cls(
            node=node,
            generation=generation,
            release=release,
            variant=manifest.variant_name,
            artifact_id=manifest.artifact_id,
            url=url,
            key_id=key_id,
            bytes=manifest.weight_bytes,
            ts=ts,
        )


class AgentHealth(_Part):
    alive: bool = Field(description="the agent answers HTTP")
    ready: bool = Field(description="the agent's /readyz says ready (warm, not swapping, not draining)")
    reason: Name | None = Field(default=None, description="why not ready or not alive")


class DeviceFactsModel(_Part):
    """``zimage_edge.device.DeviceFacts`` on the wire (a test keeps the two field sets equal)."""

    kind: DeviceKind
    name: Name
    total_memory: Bytes
    free_memory: Bytes
    compute_capability: tuple[int, int] | None = None
    unified_memory: bool = False
    system_memory: Bytes = 0

    @classmethod
    def from_facts(cls, facts: DeviceFacts) -> DeviceFactsModel:
        return cls.model_validate(dataclasses.asdict(facts))

    def to_facts(self) -> DeviceFacts:
        return DeviceFacts(**{field.name: getattr(self, field.name) for field in dataclasses.fields(DeviceFacts)})


class RunningModel(_Part):
    """The model an agent serves, as ``quantize.identity.ModelIdentity`` names it."""

    artifact_id: ArtifactId = Field(description="the artifact_id (or, for a plain directory, sha256 of its path)")
    variant: Name
    dtype: Name
    device: Name

    @classmethod
    def from_identity(cls, identity: ModelIdentity) -> RunningModel:
        return cls(artifact_id=identity.id, variant=identity.variant, dtype=identity.dtype, device=identity.device)


class ReportedState(_Payload):
    """What a node runs and how it is, written by the node whenever it changes."""

    node: NodeId
    generation: Seq = Field(description="the highest desired generation applied (0: none yet)")
    running: RunningModel | None = Field(description="the model the agent serves; null when none is loaded")
    health: AgentHealth
    device: DeviceFactsModel | None = Field(description="device facts of the node's accelerator; null when unknown")
    labels: dict[Name, Name] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="node labels, e.g. site and class"
    )
    last_error: str | None = Field(
        default=None, max_length=MAX_MESSAGE_CHARS, description="why the latest desired generation was not applied"
    )
    ts: Timestamp


class SystemStats(_Part):
    cpu_percent: Percent
    memory_used: Bytes
    memory_total: Bytes
    disk_free: Bytes = Field(description="free bytes where the model store lives")
    disk_total: Bytes
    temperatures: dict[Name, float] = Field(default_factory=dict, max_length=64, description="sensor -> degrees C")


class GpuStats(_Part):
    memory_used: Bytes
    memory_total: Bytes
    util_percent: Percent | None = Field(default=None, description="null where the platform does not report it")


class AgentStats(_Part):
    """From the agent's /metrics."""

    queue_depth: int = Field(ge=0)
    latency_p50_ms: float | None = Field(ge=0, description="null before the first generation")
    latency_p95_ms: float | None = Field(ge=0)
    error_rate: float = Field(ge=0, le=1, description="failed / all requests over the telemetry interval")
    images_generated: int = Field(ge=0, description="images generated since the agent started (a counter)")


class Telemetry(_Payload):
    node: NodeId
    seq: Seq = Field(description="per-node sequence shared with events; never reused")
    ts: Timestamp
    system: SystemStats
    gpu: GpuStats | None = None
    agent: AgentStats | None = Field(default=None, description="null when the agent's /metrics did not answer")


class EventKind(StrEnum):
    DOWNLOAD = "download"
    VERIFY = "verify"
    INSTALL = "install"
    SWAP = "swap"
    ROLLBACK = "rollback"
    ERROR = "error"


class EventPhase(StrEnum):
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Event(_Payload):
    node: NodeId
    seq: Seq = Field(description="per-node sequence shared with telemetry")
    ts: Timestamp
    kind: EventKind
    phase: EventPhase
    message: str = Field(max_length=MAX_MESSAGE_CHARS)
    reason: Name | None = Field(default=None, description="machine-readable cause of a failure, e.g. disk_full")
    progress: float | None = Field(default=None, ge=0, le=1)
    generation: Seq | None = Field(default=None, description="the desired generation this event is about")
    artifact_id: ArtifactId | None = None
    # A full outbox drops the oldest telemetry; this event says which seqs will never come, so the
    # controller's ack watermark can pass them (kind "error", reason "telemetry_dropped").
    dropped_first: Seq | None = Field(default=None, description="first seq of a range the node dropped")
    dropped_last: Seq | None = Field(default=None, description="last seq of that range (inclusive)")


class Ack(_Payload):
    """The controller's watermark for a node: every ``seq`` up to this one is stored."""

    node: NodeId
    seq: Seq


Payload = NodeState | ControllerState | DesiredState | ReportedState | Telemetry | Event | Ack


# ---------------------------------------------------------------------------------------------------
# Topics


class TopicKind(StrEnum):
    STATE = "state"
    DESIRED = "desired"
    REPORTED = "reported"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    ACK = "ack"
    CONTROLLER_STATE = "controller/state"


@dataclass(frozen=True)
class TopicSpec:
    payload: type[_Payload]
    qos: int
    retain: bool
    writer: Literal["node", "controller"]


# Birth/death, desired, reported and ack are retained (last value is the state; a late subscriber gets
# it at once). Everything is QoS 1: a persistent session then queues it for an absent subscriber.
TOPIC_SPECS: Final[dict[TopicKind, TopicSpec]] = {
    TopicKind.STATE: TopicSpec(NodeState, qos=1, retain=True, writer="node"),
    TopicKind.DESIRED: TopicSpec(DesiredState, qos=1, retain=True, writer="controller"),
    TopicKind.REPORTED: TopicSpec(ReportedState, qos=1, retain=True, writer="node"),
    TopicKind.TELEMETRY: TopicSpec(Telemetry, qos=1, retain=False, writer="node"),
    TopicKind.EVENTS: TopicSpec(Event, qos=1, retain=False, writer="node"),
    TopicKind.ACK: TopicSpec(Ack, qos=1, retain=True, writer="controller"),
    TopicKind.CONTROLLER_STATE: TopicSpec(ControllerState, qos=1, retain=True, writer="controller"),
}
NODE_KINDS: Final = tuple(kind for kind in TopicKind if kind is not TopicKind.CONTROLLER_STATE)
_KIND_OF_PAYLOAD: Final = {spec.payload: kind for kind, spec in TOPIC_SPECS.items()}


class Outgoing(NamedTuple):
    """A payload ready to publish: the field order of ``fleet.mqtt.Message``."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class Decoded(NamedTuple):
    kind: TopicKind
    node_id: str | None  # None for controller/state
    model: Payload


@dataclass(frozen=True)
class Topics:
    """Topic strings under one prefix, and the way back from a topic to its kind and node."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        levels = self.prefix.split("/")
        if not self.prefix or any(not level or level in ("+", "#") or "+" in level or "#" in level for level in levels):
            raise ValueError(f"invalid topic prefix {self.prefix!r}: non-empty levels without + or #")
        if self.prefix.startswith("$"):
            raise ValueError(f"invalid topic prefix {self.prefix!r}: $ topics belong to the broker")

    def node(self, kind: TopicKind, node_id: str) -> str:
        if kind is TopicKind.CONTROLLER_STATE:
            raise ValueError("controller/state is not a node topic")
        return f"{self.prefix}/nodes/{validate_node_id(node_id)}/{kind}"

    def state(self, node_id: str) -> str:
        return self.node(TopicKind.STATE, node_id)

    def desired(self, node_id: str) -> str:
        return self.node(TopicKind.DESIRED, node_id)

    def reported(self, node_id: str) -> str:
        return self.node(TopicKind.REPORTED, node_id)

    def telemetry(self, node_id: str) -> str:
        return self.node(TopicKind.TELEMETRY, node_id)

    def events(self, node_id: str) -> str:
        return self.node(TopicKind.EVENTS, node_id)

    def ack(self, node_id: str) -> str:
        return self.node(TopicKind.ACK, node_id)

    @property
    def controller_state(self) -> str:
        return f"{self.prefix}/{TopicKind.CONTROLLER_STATE}"

    def all_nodes(self, kind: TopicKind) -> str:
        """Subscription filter for one kind of topic of every node."""
        if kind is TopicKind.CONTROLLER_STATE:
            return self.controller_state
        return f"{self.prefix}/nodes/+/{kind}"

    def topic_for(self, model: Payload) -> str:
        """The topic a payload is published on (its kind, and its node for node payloads)."""
        node_id = node_of(model)
        if node_id is None:
            return self.controller_state
        return self.node(_KIND_OF_PAYLOAD[type(model)], node_id)

    def outgoing(self, model: Payload) -> Outgoing:
        """Topic, bytes, QoS and retain flag of a payload, as ``TOPIC_SPECS`` has it published."""
        spec = TOPIC_SPECS[_KIND_OF_PAYLOAD[type(model)]]
        return Outgoing(self.topic_for(model), encode(model), spec.qos, spec.retain)

    def parse(self, topic: str) -> tuple[TopicKind, str | None]:
        """``(kind, node_id)`` of a topic (node_id None for controller/state); ``ProtocolError`` otherwise."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ProtocolError("unknown_topic", f"{topic!r} is not under {self.prefix!r}")
        rest = topic[len(head) :]
        if rest == TopicKind.CONTROLLER_STATE:
            return TopicKind.CONTROLLER_STATE, None
        parts = rest.split("/")
        if len(parts) != 3 or parts[0] != "nodes":
            raise ProtocolError("unknown_topic", f"{topic!r} is not PREFIX/nodes/NODE/KIND")
        _, node_id, kind_name = parts
        try:
            kind = TopicKind(kind_name)
            validate_node_id(node_id)
        except ValueError as error:
            raise ProtocolError("unknown_topic", f"{topic!r}: {error}") from error
        return kind, node_id

    def decode(self, topic: str, payload: bytes) -> Decoded:
        """Parse and validate one received message; ``ProtocolError`` (with its ``reason``) if it must be dropped."""
        kind, node_id = self.parse(topic)
        if not payload:
            raise ProtocolError("empty", f"{topic!r}: empty payload (a cleared retained message)")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ProtocolError("too_large", f"{topic!r}: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
        try:
            data: Any = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as error:
            raise ProtocolError("malformed", f"{topic!r}: not JSON ({error})") from error
        if not isinstance(data, dict):
            raise ProtocolError("malformed", f"{topic!r}: a JSON {type(data).__name__}, not an object")
        version = data.get("v")
        if "v" not in data:
            raise ProtocolError("schema", f"{topic!r}: no schema version field 'v'")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise ProtocolError("version", f"{topic!r}: schema version {version!r} not in {sorted(SUPPORTED_VERSIONS)}")
        try:
            # Validated from the bytes again, in JSON mode: strict JSON accepts an enum's string and a
            # tuple's array, which strict Python mode (on the parsed dict) would refuse.
            model: Payload = TOPIC_SPECS[kind].payload.model_validate_json(payload)  # type: ignore[assignment]
        except ValidationError as error:
            raise ProtocolError("schema", f"{topic!r}: {_summary(error)}") from error
        named = node_of(model)
        if named != node_id:
            raise ProtocolError("node_mismatch", f"{topic!r}: payload names node {named!r}")
        return Decoded(kind, node_id, model)


DEFAULT_TOPICS: Final = Topics()


def node_of(model: Payload) -> str | None:
    """The node a payload is about; None for the controller's own state."""
    return None if isinstance(model, ControllerState) else model.node


def _summary(error: ValidationError) -> str:
    # The first few problems, each as "location: message"; enough to find the bug, bounded for logs.
    items = [f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors()[:3]]
    more = error.error_count() - len(items)
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")


def decode(topic: str, payload: bytes, topics: Topics = DEFAULT_TOPICS) -> Decoded:
    """``topics.decode``: parse and validate one received message or raise ``ProtocolError``."""
    return topics.decode(topic, payload)


def encode(model: Payload) -> bytes:
    """Compact JSON of a payload, as published."""
    return model.model_dump_json().encode()


# ---------------------------------------------------------------------------------------------------
# Birth and death


class StateDecision(StrEnum):
    BIRTH = "birth"  # apply: online, and this bd_seq becomes the current one
    DEATH = "death"  # apply: offline
    LATE_WILL = "late_will"  # ignore: a death of an earlier connection, after a newer birth


def state_decision(current_bd_seq: int | None, message: NodeState | ControllerState) -> StateDecision:
    """Whether a birth/death message applies, given the bd_seq of the last birth applied (None: none seen).

    MQTT keeps one publisher's messages on one topic in order, so a birth is always the newest word. A
    death applies only to the connection it was registered for: a will with another bd_seq comes from
    an earlier connection (the broker noticed it dead only after the node had reconnected) and must not
    mark the reborn node offline. With no birth seen yet (a retained death on a fresh subscription), the
    death is all there is and applies.

    A late will also replaces the retained birth on the broker, so a subscriber that starts afterwards
    sees only that death: a node that reads its own state topic back with a death of an older bd_seq
    should publish its birth again (the Sparkplug rebirth).
    """
    if message.online:
        return StateDecision.BIRTH
    if current_bd_seq is None or message.bd_seq == current_bd_seq:
        return StateDecision.DEATH
    return StateDecision.LATE_WILL
