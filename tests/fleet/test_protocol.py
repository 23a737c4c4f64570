"""The MQTT contract as pure functions: topics, payload round trips, every drop reason, the late-will rule."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fleet.protocol import (
    DEFAULT_PREFIX,
    DROP_REASONS,
    MAX_PAYLOAD_BYTES,
    NODE_ID_MAX,
    NODE_KINDS,
    TOPIC_SPECS,
    Ack,
    AgentHealth,
    AgentStats,
    ControllerState,
    DesiredState,
    DeviceFactsModel,
    Event,
    EventKind,
    EventPhase,
    GpuStats,
    NodeState,
    Payload,
    ProtocolError,
    ReportedState,
    RunningModel,
    StateDecision,
    SystemStats,
    Telemetry,
    TopicKind,
    Topics,
    decode,
    encode,
    state_decision,
    validate_node_id,
)
from quantize.identity import ModelIdentity
from quantize.manifest import (
    ComponentInfo,
    FileEntry,
    Manifest,
    PlannerRecord,
    QualityReport,
    SourceInfo,
    ToolInfo,
    VariantRecord,
    WorkloadRecord,
    artifact_id,
)
from zimage_edge.device import DeviceFacts, DeviceKind

TOPICS = Topics()
NODE = "site-a.node-1"
ARTIFACT = "ab" * 32
TS = 1_700_000_000.25
ORIN = DeviceFacts(
    kind=DeviceKind.JETSON,
    name="Orin",
    total_memory=16 * 2**30,
    free_memory=12 * 2**30,
    compute_capability=(8, 7),
    unified_memory=True,
    system_memory=16 * 2**30,
)

SAMPLES: dict[TopicKind, Payload] = {
    TopicKind.STATE: NodeState(node=NODE, online=True, bd_seq=3, ts=TS),
    TopicKind.DESIRED: DesiredState(
        node=NODE,
        generation=7,
        release="r1",
        variant="int8",
        artifact_id=ARTIFACT,
        url="http://controller:8080/artifacts/ab",
        key_id="release-key",
        bytes=123_456_789,
        ts=TS,
    ),
    TopicKind.REPORTED: ReportedState(
        node=NODE,
        generation=7,
        running=RunningModel(artifact_id=ARTIFACT, variant="int8", dtype="bfloat16", device="cuda"),
        health=AgentHealth(alive=True, ready=True),
        device=DeviceFactsModel.from_facts(ORIN),
        labels={"site": "site-a", "class": "orin-16g"},
        ts=TS,
    ),
    TopicKind.TELEMETRY: Telemetry(
        node=NODE,
        seq=2**63 - 1,
        ts=TS,
        system=SystemStats(
            cpu_percent=12.5,
            memory_used=2**30,
            memory_total=16 * 2**30,
            disk_free=50 * 2**30,
            disk_total=64 * 2**30,
            temperatures={"cpu-thermal": 51.5, "gpu-thermal": 49.0},
        ),
        gpu=GpuStats(memory_used=4 * 2**30, memory_total=16 * 2**30, util_percent=None),
        agent=AgentStats(
            queue_depth=2, latency_p50_ms=850.0, latency_p95_ms=1200.0, error_rate=0.01, images_generated=42
        ),
    ),
    TopicKind.EVENTS: Event(
        node=NODE,
        seq=11,
        ts=TS,
        kind=EventKind.DOWNLOAD,
        phase=EventPhase.PROGRESS,
        message="transformer/model-00001.safetensors",
        progress=0.25,
        generation=7,
        artifact_id=ARTIFACT,
    ),
    TopicKind.ACK: Ack(node=NODE, seq=10),
    TopicKind.CONTROLLER_STATE: ControllerState(controller="ctl-0", online=False, bd_seq=0, ts=TS),
}


def test_every_topic_kind_has_a_spec_and_a_sample() -> None:
    assert set(TOPIC_SPECS) == set(TopicKind) == set(SAMPLES)
    for kind, sample in SAMPLES.items():
        assert isinstance(sample, TOPIC_SPECS[kind].payload)


@pytest.mark.parametrize("kind", list(TopicKind))
def test_payload_round_trips_through_its_topic(kind: TopicKind) -> None:
    model = SAMPLES[kind]
    topic = TOPICS.topic_for(model)
    data = encode(model)
    decoded = decode(topic, data)
    assert decoded.kind is kind
    assert decoded.node_id == (None if kind is TopicKind.CONTROLLER_STATE else NODE)
    assert decoded.model == model
    assert json.loads(data)["v"] == 1


def test_encode_is_compact_json() -> None:
    data = encode(NodeState(node="n1", online=False, bd_seq=4, ts=1.5))
    assert data == b'{"v":1,"node":"n1","online":false,"bd_seq":4,"ts":1.5}'


def test_topics_under_the_default_and_a_custom_prefix() -> None:
    assert TOPICS.state("n1") == "zimage/v1/nodes/n1/state"
    assert TOPICS.controller_state == "zimage/v1/controller/state"
    assert TOPICS.all_nodes(TopicKind.TELEMETRY) == "zimage/v1/nodes/+/telemetry"
    custom = Topics("acme/edge/zimage/v1")
    for kind in NODE_KINDS:
        topic = custom.node(kind, "n-2")
        assert topic == f"acme/edge/zimage/v1/nodes/n-2/{kind}"
        assert custom.parse(topic) == (kind, "n-2")
    assert custom.parse(custom.controller_state) == (TopicKind.CONTROLLER_STATE, None)
    with pytest.raises(ValueError, match="not a node topic"):
        custom.node(TopicKind.CONTROLLER_STATE, "n1")


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/nodes/n1/state",  # another prefix
        "zimage/v1",  # the prefix itself
        "zimage/v1/nodes/n1",  # no kind
        "zimage/v1/nodes/n1/state/extra",  # too deep
        "zimage/v1/nodes//state",  # empty node level
        "zimage/v1/nodes/n1/firmware",  # unknown kind
        "zimage/v1/node/n1/state",  # not "nodes"
        "zimage/v1/nodes/+/state",  # a wildcard is not a node
        "zimage/v1/controller/state/x",
        f"zimage/v1/nodes/{'n' * (NODE_ID_MAX + 1)}/state",
    ],
)
def test_parse_rejects_topics_outside_the_contract(topic: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        TOPICS.parse(topic)
    assert caught.value.reason == "unknown_topic"


@pytest.mark.parametrize("node_id", ["n1", "site-a.node_1", "10.0.0.7", "host:2", "N" * NODE_ID_MAX])
def test_valid_node_ids(node_id: str) -> None:
    assert validate_node_id(node_id) == node_id


@pytest.mark.parametrize(
    "node_id",
    ["", "a/b", "a+", "#", "+", "$SYS", "-leading", ".hidden", "with space", "tab\t", "ünï", "N" * (NODE_ID_MAX + 1)],
)
def test_invalid_node_ids(node_id: str) -> None:
    with pytest.raises(ValueError, match="invalid node id"):
        validate_node_id(node_id)
    with pytest.raises(ValueError, match="invalid node id"):
        TOPICS.state(node_id)
    with pytest.raises(ValueError, match="validation error"):  # the same rule holds inside payloads
        NodeState(node=node_id, online=True, bd_seq=0, ts=0)


@pytest.mark.parametrize("prefix", ["", "/zimage", "zimage/", "zimage//v1", "zimage/+/v1", "zimage/#", "$SYS/x"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid topic prefix"):
        Topics(prefix)


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


def _state(**changes: object) -> bytes:
    return _json({"v": 1, "node": "n1", "online": True, "bd_seq": 1, "ts": 1.0} | changes)


# (why, topic, payload, reason): one or more cases for every reason in DROP_REASONS.
DROPS = [
    ("foreign prefix", "other/nodes/n1/state", _state(), "unknown_topic"),
    ("unknown kind", "zimage/v1/nodes/n1/logs", _state(), "unknown_topic"),
    ("cleared retained", "zimage/v1/nodes/n1/state", b"", "empty"),
    ("oversized", "zimage/v1/nodes/n1/state", b" " * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    ("not json", "zimage/v1/nodes/n1/state", b"online", "malformed"),
    ("not utf-8", "zimage/v1/nodes/n1/state", b"\xff\xfe{}", "malformed"),
    ("json array", "zimage/v1/nodes/n1/state", b"[1, 2]", "malformed"),
    ("future version", "zimage/v1/nodes/n1/state", _state(v=2), "version"),
    ("version as string", "zimage/v1/nodes/n1/state", _state(v="1"), "version"),
    ("version as bool", "zimage/v1/nodes/n1/state", _state(v=True), "version"),
    ("no version", "zimage/v1/nodes/n1/state", _json({"node": "n1", "online": True, "bd_seq": 1, "ts": 1}), "schema"),
    ("missing field", "zimage/v1/nodes/n1/state", _json({"v": 1, "node": "n1", "online": True, "ts": 1}), "schema"),
    ("extra field", "zimage/v1/nodes/n1/state", _state(extra=1), "schema"),
    ("string for int", "zimage/v1/nodes/n1/state", _state(bd_seq="1"), "schema"),
    ("negative seq", "zimage/v1/nodes/n1/ack", _json({"v": 1, "node": "n1", "seq": -1}), "schema"),
    ("seq beyond int64", "zimage/v1/nodes/n1/ack", _json({"v": 1, "node": "n1", "seq": 2**63}), "schema"),
    ("state payload on the desired topic", "zimage/v1/nodes/n1/desired", _state(), "schema"),
    ("ack payload on the telemetry topic", "zimage/v1/nodes/n1/telemetry", encode(Ack(node="n1", seq=1)), "schema"),
    (
        "short artifact id",
        "zimage/v1/nodes/n1/desired",
        encode(SAMPLES[TopicKind.DESIRED]).replace(ARTIFACT.encode(), b"abc"),
        "schema",
    ),
    ("other node's payload", "zimage/v1/nodes/n2/state", _state(), "node_mismatch"),
    ("ack for another node", "zimage/v1/nodes/n2/ack", encode(Ack(node="n1", seq=1)), "node_mismatch"),
]


@pytest.mark.parametrize(("why", "topic", "payload", "reason"), DROPS, ids=[case[0] for case in DROPS])
def test_decode_drops_with_a_reason(why: str, topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(topic, payload)
    assert caught.value.reason == reason, why
    assert reason in DROP_REASONS


def test_every_drop_reason_is_exercised() -> None:
    assert {case[3] for case in DROPS} == set(DROP_REASONS)


def test_device_facts_mirror_the_dataclass() -> None:
    assert set(DeviceFactsModel.model_fields) == {field.name for field in dataclasses.fields(DeviceFacts)}
    model = DeviceFactsModel.from_facts(ORIN)
    wire = DeviceFactsModel.model_validate_json(model.model_dump_json())
    assert wire.to_facts() == ORIN
    assert json.loads(model.model_dump_json()) == ORIN.to_dict()
    cpu = DeviceFacts(kind=DeviceKind.CPU, name="cpu", total_memory=1, free_memory=1)
    assert DeviceFactsModel.from_facts(cpu).to_facts() == cpu


def _manifest() -> Manifest:
    return Manifest(
        model_id="Tongyi-MAI/Z-Image-Turbo",
        source=SourceInfo(id="Tongyi-MAI/Z-Image-Turbo", sha256="0" * 64),
        variant=VariantRecord(
            name="int8", description="int8 weights", storage_dtype="bfloat16", components={}, int4_group_size=128,
            thresholds={},
        ),
        components={
            "transformer": ComponentInfo(params=10, quantized_params=8, qtype="qint8", bytes=10, bf16_bytes=20),
        },
        files={
            "transformer/model-00001.safetensors": FileEntry(sha256="1" * 64, size=1000),
            "model_index.json": FileEntry(sha256="2" * 64, size=24),
        },
        planner=PlannerRecord(
            workload=WorkloadRecord(width=512, height=512, batch=1), dtype="bfloat16", weights_bytes={},
            activation_bytes={}, peak_device_bytes={},
        ),
        quality=QualityReport(status="not_measured_forced", reason="test"),
        tool=ToolInfo(version="0.1.0", libraries={}),
        created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip


def test_desired_state_is_read_from_the_manifest() -> None:
    manifest = _manifest()
    desired = DesiredState.for_manifest(
        "n1", generation=3, release="r7", manifest=manifest, url="https://ctl/a/x", ts=TS, key_id="k1"
    )
    assert desired.artifact_id == artifact_id(manifest)
    assert desired.variant == "int8"
    assert desired.bytes == 1024
    assert decode(TOPICS.desired("n1"), encode(desired)).model == desired


def test_running_model_from_the_model_identity() -> None:
    identity = ModelIdentity(
        id=ARTIFACT, source="/models/x", variant="int8", dtype="bfloat16", device="cuda:0", default_size=1024
    )
    assert RunningModel.from_identity(identity) == RunningModel(
        artifact_id=ARTIFACT, variant="int8", dtype="bfloat16", device="cuda:0"
    )


def _birth(bd_seq: int) -> NodeState:
    return NodeState(node="n1", online=True, bd_seq=bd_seq, ts=TS)


def _death(bd_seq: int) -> NodeState:
    return NodeState(node="n1", online=False, bd_seq=bd_seq, ts=TS)


@pytest.mark.parametrize(
    ("current", "message", "decision"),
    [
        (None, _birth(0), StateDecision.BIRTH),
        (4, _birth(5), StateDecision.BIRTH),
        (5, _birth(5), StateDecision.BIRTH),  # the same birth again (a retained copy) changes nothing
        (None, _death(3), StateDecision.DEATH),  # only a retained death is known: it stands
        (5, _death(5), StateDecision.DEATH),
        (5, _death(4), StateDecision.LATE_WILL),  # the will of the previous connection, after the rebirth
        (5, _death(6), StateDecision.LATE_WILL),
    ],
)
def test_state_decision(current: int | None, message: NodeState, decision: StateDecision) -> None:
    assert state_decision(current, message) is decision


def test_a_late_will_does_not_take_a_reborn_node_offline() -> None:
    current: int | None = None
    online = False
    decisions = []
    for message in [_birth(1), _birth(2), _death(1), _death(2), _birth(3)]:
        decision = state_decision(current, message)
        decisions.append(decision)
        if decision is StateDecision.BIRTH:
            current, online = message.bd_seq, True
        elif decision is StateDecision.DEATH:
            online = False
        if message.bd_seq == 1 and not message.online:
            assert online, "the late will of bd_seq 1 marked the node offline"
    assert decisions == [
        StateDecision.BIRTH, StateDecision.BIRTH, StateDecision.LATE_WILL, StateDecision.DEATH, StateDecision.BIRTH,
    ]  # fmt: skip
    assert online


def test_the_controller_state_follows_the_same_rule() -> None:
    assert state_decision(2, ControllerState(controller="c", online=False, bd_seq=1, ts=0)) is StateDecision.LATE_WILL
    assert TOPICS.prefix == DEFAULT_PREFIX


@pytest.mark.parametrize("kind", list(TopicKind))
def test_outgoing_follows_the_topic_specs(kind: TopicKind) -> None:
    sample = SAMPLES[kind]
    outgoing = TOPICS.outgoing(sample)
    assert (outgoing.qos, outgoing.retain) == (TOPIC_SPECS[kind].qos, TOPIC_SPECS[kind].retain)
    assert decode(outgoing.topic, outgoing.payload) == (kind, decode(outgoing.topic, outgoing.payload).node_id, sample)
