"""The controller's store, every test on a SQLite file and on a PostgreSQL database: dedup, ack
watermarks, restarts, the schema guard (migrations have their own module, test_store_migrations)."""

from __future__ import annotations

import hashlib
import random
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text, update

from fleet import schema as schema_module
from fleet import store as store_module
from fleet.rollout import (
    Gates,
    NodePhase,
    RolloutSpec,
    RolloutStatus,
    SetDesired,
    Target,
    Telemetry,
    choose_variant,
    start,
    step,
)
from fleet.schema import SchemaVersionError, StoreError, database_url
from fleet.store import Failure, Gap, Ingested, Report, StateChange, Store, TelemetrySample
from quantize.distill.spec import student_spec
from quantize.manifest import (
    ComponentInfo,
    DistillationRecord,
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
from quantize.profiles import PROFILES
from quantize.specs import Z_IMAGE_TURBO
from quantize.variants import VARIANTS, student_variant


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(make_store_database: Callable[[], str]) -> str:
    """Where the store lives, on each engine in turn: a SQLite file path or a PostgreSQL URL."""
    return make_store_database()


@pytest.fixture
def store(db: str, clock: Clock):
    with Store.open(db, clock=clock) as opened:
        yield opened


def manifest(variant: str, model_id: str = "Tongyi-MAI/Z-Image-Turbo") -> Manifest:
    """A manifest as ``quantize`` writes one (sizes made up; nothing here reads the weights)."""
    digest = hashlib.sha256(variant.encode()).hexdigest()
    return Manifest(
        model_id=model_id,
        source=SourceInfo(id=model_id, sha256=hashlib.sha256(model_id.encode()).hexdigest()),
        variant=VariantRecord.model_validate(VARIANTS[variant].to_dict()),
        components={"transformer": ComponentInfo(params=10, quantized_params=8, qtype=None, bytes=20, bf16_bytes=20)},
        files={"transformer/model-00001.safetensors": FileEntry(sha256=digest, size=1_234_567)},
        planner=PlannerRecord(
            workload=WorkloadRecord(width=1024, height=1024, batch=1), dtype="bfloat16",
            weights_bytes={}, activation_bytes={}, peak_device_bytes={},
        ),
        quality=QualityReport(status="passed", reason="within thresholds", psnr_db_mean=41.25),
        tool=ToolInfo(version="0.1.0", libraries={}),
        created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip


def samples(node: str, *seqs: int) -> list[TelemetrySample]:
    return [TelemetrySample(node, seq, {"seq": seq, "error_rate": 0.0, "p95_ms": 800.5}) for seq in seqs]


def test_sqlite_runs_in_wal_with_a_busy_timeout(tmp_path: Path) -> None:
    with Store.open(tmp_path / "fleet.db") as store, store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() == schema_module.SQLITE_BUSY_TIMEOUT_MS
        assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1


def test_the_switch_to_wal_waits_out_another_connections_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite refuses the switch at once, without its busy handler, while another connection holds the write
    lock (a replica starting at the same moment): the store asks again instead of failing to start."""
    path = tmp_path / "fleet.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, on a new file, as a replica's migration takes it
    retried = threading.Event()
    real_sleep = schema_module.time.sleep

    def sleep(seconds: float) -> None:
        retried.set()
        real_sleep(seconds)

    monkeypatch.setattr(schema_module.time, "sleep", sleep)
    with ThreadPoolExecutor(1, thread_name_prefix="open-store") as pool:
        opening = pool.submit(Store.open, path)
        assert retried.wait(10), "the store never asked again"
        holder.rollback()  # the other writer commits or gives up: the lock is free
        holder.close()
        opened = opening.result(timeout=30)
    with opened as store, store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"


def test_the_switch_to_wal_gives_up_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.db"
    monkeypatch.setattr(schema_module, "SQLITE_BUSY_TIMEOUT_MS", 50)
    with closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="could not switch the database to WAL mode: database is locked"):
            Store.open(path)
        holder.rollback()
        assert holder.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # nothing changed


def test_telemetry_is_stored_once_per_node_and_seq(store: Store, clock: Clock) -> None:
    assert store.record_telemetry(samples("n1", 1, 2, 3)) == 3
    clock.now += 5
    assert store.record_telemetry(samples("n1", 2, 3, 4)) == 1  # an outbox resent after a lost ack
    assert store.record_telemetry(samples("n1", 5, 5)) == 1  # the same sample twice in one batch
    assert store.record_telemetry(samples("n2", 1)) == 1  # seqs are per node
    assert store.record_telemetry([]) == 0
    assert store.telemetry_count("n1") == 5
    assert store.telemetry_count() == 6
    latest = store.latest_telemetry("n1")
    assert latest is not None
    assert (latest.seq, latest.received_at) == (5, 1005.0)
    assert latest.payload == {"seq": 5, "error_rate": 0.0, "p95_ms": 800.5}
    first = store.latest_telemetry("n2")
    assert first is not None
    assert first.received_at == 1005.0
    assert store.latest_telemetry("n3") is None


def test_the_ack_watermark_is_the_highest_contiguous_seq(store: Store) -> None:
    assert store.advance_ack("n1") == 0
    store.record_telemetry(samples("n1", 1, 2, 3, 5, 6))
    assert store.advance_ack("n1") == 3  # 4 is missing: the node must keep 4, 5 and 6
    # Events share the node's seq: one fills the hole, and is not mistaken for a telemetry sample.
    store.record_telemetry([TelemetrySample("n1", 4, {"kind": "install", "phase": "started"}, kind="events")])
    assert store.advance_ack("n1") == 6
    assert store.ack_watermark("n1") == 6
    assert store.telemetry_count("n1", kind="events") == 1
    # The node dropped 7..9 and 11 on outbox overflow but kept event 10: the holes will never fill.
    store.record_telemetry([TelemetrySample("n1", 10, {}, kind="events")])
    latest = store.latest_telemetry("n1")
    assert latest is not None
    assert (latest.seq, latest.kind) == (6, "telemetry")  # the gates judge samples, not events
    store.record_telemetry(samples("n1", 12, 13))
    assert store.advance_ack("n1") == 6
    store.record_gap("n1", 11, 11)
    assert store.advance_ack("n1") == 6  # 7..9 still missing: a later gap changes nothing yet
    store.record_gap("n1", 7, 9)
    assert store.advance_ack("n1") == 13  # over 7..9, 10, over 11, 12, 13
    # A gap declared again, or one already passed, never moves the watermark backwards.
    store.record_gap("n1", 7, 8)
    assert store.advance_ack("n1") == 13
    assert store.ack_watermark("n2") == 0


def test_the_ack_walk_crosses_a_backlog_longer_than_one_read(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "ACK_SCAN_CHUNK", 3)
    store.record_telemetry(samples("n1", *range(1, 11), 12))
    assert store.advance_ack("n1") == 10


def _agent(node: str, seq: int, error_rate: float, p95_ms: float) -> TelemetrySample:
    return TelemetrySample(node, seq, {"seq": seq, "agent": {"error_rate": error_rate, "latency_p95_ms": p95_ms}})


def test_a_batch_is_stored_in_one_go_with_gaps_failures_latest_samples_and_acks(store: Store, clock: Clock) -> None:
    store.record_birth("n1", bd_seq=1)
    first = store.ingest([_agent("n1", 1, 0.0, 900.0), _agent("n1", 2, 0.1, 950.0), _agent("n2", 1, 0.0, 700.0)])
    assert (first.new, first.duplicates, first.acks) == (3, 0, {"n1": 2, "n2": 1})
    # Redelivered samples are counted, not stored; a watermark that does not move is not announced.
    clock.now += 1
    again = store.ingest([_agent("n1", 2, 0.1, 950.0), _agent("n2", 3, 0.5, 5000.0)])
    assert (again.new, again.duplicates, again.acks) == (1, 1, {})
    # The latest telemetry the gates read is the highest seq, whenever it arrives.
    n1, n2 = store.get_node("n1"), store.get_node("n2")
    assert n1 is not None
    assert n1.telemetry == Telemetry(at=1000.0, error_rate=0.1, p95_ms=950.0)
    assert n2 is not None
    assert n2.telemetry == Telemetry(at=1001.0, error_rate=0.5, p95_ms=5000.0)
    late = store.ingest([_agent("n2", 2, 0.0, 1.0)])  # seq 2 after 3: fills the hole, is not the latest
    assert late.acks == {"n2": 3}
    assert store.get_node("n2").telemetry.p95_ms == 5000.0  # type: ignore[union-attr]
    # An event sample, a declared gap and a refusal in one batch.
    event = TelemetrySample("n1", 3, {"kind": "install", "phase": "failed"}, kind="events")
    done = store.ingest([event], gaps=[Gap("n1", 4, 6)], failures=[Failure("n1", 7, "disk full")])
    assert done.acks == {"n1": 6}
    n1 = store.get_node("n1")
    assert n1 is not None
    assert (n1.failed_generation, n1.error) == (7, "disk full")
    assert n1.telemetry is not None
    assert n1.telemetry.p95_ms == 950.0
    assert store.ingest([]) == Ingested(new=0, duplicates=0, acks={})
    # Gate readings are the worst since the node last changed what it runs: a new generation resets them.
    store.record_reported("n2", generation=0, artifact=None, ready=True)
    assert store.get_node("n2").telemetry.p95_ms == 5000.0  # type: ignore[union-attr]
    store.record_reported("n2", generation=1, artifact="a" * 64, ready=True)
    reset = store.get_node("n2")
    assert reset is not None
    assert reset.telemetry == Telemetry(at=1001.0, error_rate=None, p95_ms=None)
    store.ingest([_agent("n2", 4, 0.0, 600.0)])
    assert store.get_node("n2").telemetry.p95_ms == 600.0  # type: ignore[union-attr]


def test_a_bad_gap_changes_nothing(store: Store) -> None:
    with pytest.raises(ValueError, match="empty"):
        store.ingest(samples("n1", 1), gaps=[Gap("n1", 5, 4)])
    assert store.telemetry_count() == 0
    assert store.ack_watermark("n1") == 0


@pytest.mark.parametrize("seed", range(6))
def test_the_batch_ack_walk_agrees_with_the_one_node_walk(
    make_store_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Random histories (out of order, redelivered, holes, declared gaps, backlogs over one read): the
    watermarks ``ingest`` moves in bulk equal what ``advance_ack`` finds node by node."""
    monkeypatch.setattr(store_module, "ACK_SCAN_CHUNK", 4)
    rng = random.Random(seed)
    nodes = [f"n{i}" for i in range(5)]
    with Store.open(make_store_database()) as bulk, Store.open(make_store_database()) as single:
        for _ in range(25):
            batch = [TelemetrySample(rng.choice(nodes), rng.randint(1, 40), {}) for _ in range(rng.randint(0, 12))]
            gaps = []
            if rng.random() < 0.3:
                first = rng.randint(1, 40)
                gaps.append(Gap(rng.choice(nodes), first, first + rng.randint(0, 5)))
            moved = bulk.ingest(batch, gaps=gaps)
            single.record_telemetry(batch)
            for gap in gaps:
                single.record_gap(gap.node, gap.first, gap.last)
            for node in nodes:
                before = single.ack_watermark(node)
                after = single.advance_ack(node)
                assert moved.acks.get(node, before) == after, (node, batch, gaps)
                assert bulk.ack_watermark(node) == after


def test_a_late_will_does_not_mark_a_reborn_node_offline(store: Store, clock: Clock) -> None:
    store.record_birth("n1", bd_seq=1)
    clock.now = 1010.0
    store.record_birth("n1", bd_seq=2)
    assert store.record_death("n1", bd_seq=1) is False
    node = store.get_node("n1")
    assert node is not None
    assert (node.online, node.bd_seq, node.last_seen) == (True, 2, 1010.0)
    assert store.record_death("n1", bd_seq=2) is True
    node = store.get_node("n1")
    assert node is not None
    assert node.online is False
    # A retained death on a fresh subscription, before any birth: it is all there is, and applies.
    assert store.record_death("n2", bd_seq=7) is True
    n2 = store.get_node("n2")
    assert n2 is not None
    assert (n2.online, n2.bd_seq) == (False, 7)


@pytest.mark.parametrize("per_transaction", [2, store_module.CHANGES_PER_TRANSACTION])
def test_births_deaths_and_reports_of_a_batch_apply_in_order(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch, per_transaction: int
) -> None:
    """A fleet reconnecting at once: each node's birth and report, with telemetry, in one ``ingest`` (its
    changes written a few to a transaction: each node's in its order, whatever the chunks)."""
    monkeypatch.setattr(store_module, "CHANGES_PER_TRANSACTION", per_transaction)
    facts = PROFILES["t4-16gb"].facts()
    store.record_birth("n2", bd_seq=1)
    changes = [
        StateChange("n1", 1, online=True),
        Report("n1", generation=2, artifact="a" * 64, ready=True, facts=facts, labels={"site": "berlin"}),
        StateChange("n2", 2, online=True),
        StateChange("n2", 1, online=False),  # the will of n2's earlier connection, after its rebirth
        StateChange("n3", 1, online=True),
        StateChange("n3", 1, online=False),  # n3 went away again: its own connection's death applies
    ]
    done = store.ingest([_agent("n1", 1, 0.0, 900.0)], changes=changes)
    assert (done.new, done.acks, done.late_wills) == (1, {"n1": 1}, 1)
    n1, n2, n3 = (store.get_node(n) for n in ("n1", "n2", "n3"))
    assert n1 is not None
    assert n2 is not None
    assert n3 is not None
    assert (n1.online, n1.bd_seq, n1.reported_generation, n1.facts, n1.labels) == (
        True, 1, 2, facts, {"site": "berlin"})  # fmt: skip
    assert n1.telemetry is not None
    assert n1.telemetry.p95_ms == 900.0
    assert (n2.online, n2.bd_seq) == (True, 2)
    assert (n3.online, n3.bd_seq) == (False, 1)

    # A bad part (an empty gap) is refused before anything of the batch is written.
    with pytest.raises(ValueError, match="empty"):
        store.ingest(samples("n4", 1), gaps=[Gap("n4", 5, 4)], changes=[StateChange("n4", 1, online=True)])
    assert store.get_node("n4") is None
    assert store.telemetry_count() == 1


def test_reported_state_keeps_facts_and_labels(store: Store) -> None:
    facts = PROFILES["t4-16gb"].facts()
    store.record_birth("n1", bd_seq=1)
    store.record_reported("n1", generation=3, artifact="a" * 64, ready=True, health="ready", facts=facts,
                          labels={"site": "berlin", "class": "t4"})  # fmt: skip
    store.record_desired("n1", generation=4, artifact="b" * 64)
    store.record_failure("n1", generation=4, error="disk full: needs 9 GiB")
    store.record_failure("n1", generation=2, error="an older failure, delivered late")
    node = store.get_node("n1")
    assert node is not None
    assert node.facts == facts
    assert node.labels == {"site": "berlin", "class": "t4"}
    assert (node.reported_generation, node.desired_generation, node.desired_artifact) == (3, 4, "b" * 64)
    assert node.online is True
    observation = node.observation()
    assert (observation.failed_generation, observation.error) == (4, "disk full: needs 9 GiB")
    assert (observation.artifact, observation.ready, observation.labels) == ("a" * 64, True, node.labels)
    assert [n.id for n in store.list_nodes()] == ["n1"]


def test_releases_are_immutable_and_carry_their_manifests(store: Store) -> None:
    manifests = [manifest("int8"), manifest("bf16")]
    store.add_release("r1", manifests, urls={"bf16": "https://cdn.example/bf16"})
    release = store.get_release("r1")
    assert release is not None
    assert [v.variant for v in release.variants] == ["bf16", "int8"]
    bf16 = release.variant("bf16")
    assert bf16 is not None
    assert bf16.artifact_id == artifact_id(manifests[1])  # the identity survives the JSON column
    assert bf16.url == "https://cdn.example/bf16"
    assert bf16.bytes == manifests[1].weight_bytes
    assert bf16.release_variant().recipe == VARIANTS["bf16"]
    with pytest.raises(StoreError, match="already exists"):
        store.add_release("r1", [manifest("int4")])
    with pytest.raises(StoreError, match="different models"):
        store.add_release("r2", [manifest("int8"), manifest("int4", model_id="other/model")])
    assert [r.name for r in store.list_releases()] == ["r1"]
    assert store.get_release("r2") is None


def test_rollout_state_survives_a_controller_restart(db: str, clock: Clock) -> None:
    target = Target("int8", artifact_id(manifest("int8")))
    spec = RolloutSpec("r1", selector={"site": "a"}, waves=(1, "100%"), bake_s=60.0, gates=Gates(max_error_rate=0.05))
    with Store.open(db, clock=clock) as first:
        first.add_release("r1", [manifest("int8")])
        for node in ("n1", "n2"):
            first.record_birth(node, bd_seq=1)
            first.record_reported(node, generation=2, artifact="0" * 64, ready=True, labels={"site": "a"})
        observations = {node.id: node.observation() for node in first.list_nodes()}
        state = start("ro-1", spec, observations, {"n1": target, "n2": target}, clock.now)
        decision = step(state, observations, clock.now)
        for action in decision.actions:
            assert isinstance(action, SetDesired)
            first.record_desired(action.node, action.generation, action.artifact)
        first.save_rollout(decision.state)
        before = decision.state

    clock.now += 30
    with Store.open(db, clock=clock) as second:
        assert second.load_rollout("ro-1") == before
        active = second.list_rollouts({RolloutStatus.RUNNING, RolloutStatus.PAUSED})
        assert active == [before]
        n1 = second.get_node("n1")
        assert n1 is not None
        assert n1.desired_generation == 3  # the next desired state goes above what was sent before the restart
        second.record_reported("n1", generation=3, artifact=target.artifact, ready=True)
        observations = {node.id: node.observation() for node in second.list_nodes()}
        resumed = step(before, observations, clock.now)
        assert resumed.state.node("n1").phase is NodePhase.READY
        second.save_rollout(resumed.state)
        assert second.load_rollout("ro-1") == resumed.state
        assert second.list_rollouts({RolloutStatus.SUCCEEDED}) == []
        with pytest.raises(StoreError, match="not registered"):
            second.save_rollout(start("ro-2", RolloutSpec("nope"), {}, {}, clock.now))


def test_a_newer_schema_is_refused(db: str, clock: Clock) -> None:
    Store.open(db, clock=clock).close()
    engine = create_engine(database_url(db))
    with engine.begin() as conn:
        conn.execute(update(schema_module.meta).values(value=str(schema_module.SCHEMA_VERSION + 1)))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="newer than this zimage-edge's"):
        Store.open(db, clock=clock)


def test_a_database_that_is_not_a_fleet_store_is_refused(db: str, clock: Clock) -> None:
    engine = create_engine(database_url(db))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(StoreError, match="not a fleet store"):
        Store.open(db, clock=clock)


def test_a_new_store_records_its_schema_version(store: Store) -> None:
    assert store.schema_version == schema_module.SCHEMA_VERSION


def test_drop_counters_add_up(store: Store) -> None:
    store.count_drop("controller", "malformed")
    store.count_drop("controller", "malformed", 2)
    store.count_drop("n1", "outbox_overflow", 40)
    assert store.drop_counts() == {("controller", "malformed"): 3, ("n1", "outbox_overflow"): 40}


def test_numbers_json_cannot_hold_are_stored_as_null(store: Store) -> None:
    """A sensor's NaN: PostgreSQL's JSONB refuses it (failing the whole batch), so it is null everywhere."""
    payload = {"system": {"temperatures": {"gpu": float("nan"), "cpu": float("inf"), "board": 41.5}}, "x": [-0.0]}
    assert store.ingest([TelemetrySample("n1", 1, payload), *samples("n2", 1)]).new == 2
    latest = store.latest_telemetry("n1")
    assert latest is not None
    assert latest.payload == {"system": {"temperatures": {"gpu": None, "cpu": None, "board": 41.5}}, "x": [-0.0]}


def test_a_name_longer_than_its_column_is_refused_on_every_engine(store: Store, clock: Clock) -> None:
    """The API takes release names of up to 200 characters; PostgreSQL would fail the write mid-transaction
    and SQLite would keep the name: both refuse it, before writing anything."""
    longest = "r" * schema_module.NAME_LENGTH
    store.add_release(longest, [manifest("int8")])
    with pytest.raises(StoreError, match="1-128 characters, not 129"):
        store.add_release(longest + "r", [manifest("int8")])
    with pytest.raises(StoreError, match="rollout name"):
        store.save_rollout(start("r" * 129, RolloutSpec(longest), {}, {}, clock.now))
    assert [release.name for release in store.list_releases()] == [longest]


def _student(base: str, teacher: Manifest) -> Manifest:
    """A student artifact's manifest (``student-<base>``): its own source (the student's directory), its
    teacher recorded."""
    made = manifest(base, model_id="shapes-student")
    recipe = VariantRecord.model_validate(student_variant(VARIANTS[base]).to_dict())
    record = DistillationRecord(
        teacher_id=teacher.model_id, teacher_sha256=teacher.source.sha256, quality={},
        components={
            "transformer": {"recipe": {"keep": 2}, "teacher_layers": 4, "params": 945_856, "teacher_params": 1_242_496},
            "text_encoder": {"recipe": {"layers": 2}, "params": 29_056, "teacher_params": 90_752},
        },
    )  # fmt: skip
    return made.model_copy(update={"distillation": record, "variant": recipe})


def test_a_release_carries_a_student_beside_its_teacher_and_the_smallest_node_gets_it(store: Store) -> None:
    teacher = manifest("int4")
    release = store.add_release("r1", [teacher, _student("int8", teacher)])
    by_name = {record.variant: record.release_variant() for record in release.variants}
    student = by_name["student-int8"].model
    assert by_name["int4"].model is None  # the release's own model
    assert student is not None
    # 2 of 4 layers and a third of the text encoder stand for 15 of 30 layers and a third of Qwen3-4B.
    assert student.transformer.total_params == student_spec(Z_IMAGE_TURBO, name="x", keep=15).transformer.total_params
    assert student.text_encoder.total_params == round(Z_IMAGE_TURBO.text_encoder.total_params * 29_056 / 90_752)
    variants = list(by_name.values())
    assert choose_variant(PROFILES["jetson-orin-nano-8gb"].facts(), variants).variant == "student-int8"
    assert choose_variant(PROFILES["t4-16gb"].facts(), variants).variant == "int4"
    # A student of another model is refused like any artifact of another model.
    other = _student("int4", manifest("int4", model_id="another-model"))
    with pytest.raises(StoreError, match="different models"):
        store.add_release("r2", [teacher, other])
    assert store.get_release("r2") is None
