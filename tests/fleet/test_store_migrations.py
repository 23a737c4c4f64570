"""The store's schema under Alembic, on SQLite and PostgreSQL: from empty to head, databases of earlier
versions (made with and without Alembic) upgraded with their data, newer ones refused, the migration lock."""

from __future__ import annotations

import multiprocessing
import threading
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.pool import NullPool

from fleet import schema as schema_module
from fleet.cli import ControllerSettings
from fleet.rollout import RolloutSpec, Telemetry, start
from fleet.schema import (
    SCHEMA_VERSION,
    SchemaVersionError,
    StoreError,
    alembic_config,
    database_url,
    metadata,
    schema_revisions,
)
from fleet.store import Store, TelemetrySample
from quantize.manifest import artifact_id
from quantize.profiles import PROFILES
from tests.fleet.test_store import Clock, manifest

HEAD = schema_revisions()[SCHEMA_VERSION]
# Forked replicas are ready in milliseconds; this bounds one that never reaches the barrier.
REPLICA_START_TIMEOUT_S = 30.0
# Controller replicas started at once in the concurrency tests: enough to race, few on a 2-core machine.
REPLICAS = 4


def v1_metadata() -> MetaData:
    """The tables exactly as ``fleet/store.py`` declared them at schema version 1, before Alembic (a frozen
    copy of ``git show b9f8862:fleet/store.py``): what a database of the first release holds."""
    json = JSON().with_variant(postgresql.JSONB(), "postgresql")
    v1 = MetaData()
    Table("meta", v1, Column("key", String(64), primary_key=True), Column("value", String(256), nullable=False))
    Table(
        "nodes", v1,
        Column("id", String(128), primary_key=True), Column("labels", json, nullable=False),
        Column("facts", json, nullable=True), Column("artifact", String(64), nullable=True),
        Column("reported_generation", BigInteger, nullable=False),
        Column("desired_generation", BigInteger, nullable=False),
        Column("desired_artifact", String(64), nullable=True), Column("ready", Boolean, nullable=False),
        Column("health", Text, nullable=True), Column("failed_generation", BigInteger, nullable=False),
        Column("error", Text, nullable=True), Column("online", Boolean, nullable=False),
        Column("bd_seq", BigInteger, nullable=True), Column("last_seen", Float, nullable=True),
    )  # fmt: skip
    Table("releases", v1, Column("name", String(128), primary_key=True), Column("created", Float, nullable=False))
    Table(
        "release_variants", v1,
        Column("release", String(128), ForeignKey("releases.name"), primary_key=True),
        Column("variant", String(64), primary_key=True), Column("artifact_id", String(64), nullable=False),
        Column("bytes", BigInteger, nullable=False), Column("url", Text, nullable=True),
        Column("manifest", json, nullable=False),
    )  # fmt: skip
    Table(
        "rollouts", v1,
        Column("id", String(128), primary_key=True),
        Column("release", String(128), ForeignKey("releases.name"), nullable=False),
        Column("spec", json, nullable=False), Column("state", json, nullable=False),
        Column("status", String(16), nullable=False), Column("created", Float, nullable=False),
        Column("updated", Float, nullable=False), Index("rollouts_status", "status"),
    )  # fmt: skip
    Table(
        "telemetry", v1,
        Column("node", String(128), primary_key=True), Column("seq", BigInteger, primary_key=True),
        Column("kind", String(16), nullable=False), Column("received_at", Float, nullable=False),
        Column("payload", json, nullable=False),
    )  # fmt: skip
    Table(
        "telemetry_gaps", v1,
        Column("node", String(128), primary_key=True), Column("first_seq", BigInteger, primary_key=True),
        Column("last_seq", BigInteger, nullable=False),
    )  # fmt: skip
    Table("acks", v1, Column("node", String(128), primary_key=True), Column("seq", BigInteger, nullable=False))
    Table(
        "drops", v1,
        Column("source", String(128), primary_key=True), Column("reason", String(64), primary_key=True),
        Column("dropped", BigInteger, nullable=False),
    )  # fmt: skip
    return v1


V1 = v1_metadata()


@pytest.fixture
def db(make_store_database: Callable[[], str]) -> str:
    return make_store_database()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@contextmanager
def connect(db: str) -> Iterator[Connection]:
    """A transaction on the database, beside the store (as an operator's tool or an old release would)."""
    engine = create_engine(database_url(db), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def schema_differences(conn: Connection, target: MetaData) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match ``target`` (nothing: equal)."""
    return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), target)


def migrate(db: str, revision: str) -> None:
    """Run the shipped migrations up to ``revision`` (as an earlier release with Alembic would have)."""
    with connect(db) as conn:
        command.upgrade(alembic_config(conn), revision)


def version_1_database(db: str, with_alembic: bool) -> None:
    """A database as the first release left it: its tables, and ``meta`` at 1 (Alembic-stamped or not)."""
    if with_alembic:
        migrate(db, schema_revisions()[1])
    else:
        with connect(db) as conn:
            V1.create_all(conn)
            conn.execute(V1.tables["meta"].insert().values(key="schema_version", value="1"))


def agent_sample(seq: int, error_rate: float, p95_ms: float) -> dict[str, Any]:
    return {"seq": seq, "agent": {"error_rate": error_rate, "latency_p95_ms": p95_ms, "queue_depth": 0}}


def test_the_revisions_end_at_this_codes_schema_version() -> None:
    assert sorted(schema_revisions()) == list(range(1, SCHEMA_VERSION + 1))  # one per version, none missing
    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [HEAD]  # one line of history


def test_an_empty_database_is_migrated_to_exactly_the_tables_the_code_uses(db: str) -> None:
    with Store.open(db) as store:
        assert (store.revision, store.schema_version) == (HEAD, SCHEMA_VERSION)
    with connect(db) as conn:
        assert schema_differences(conn, metadata) == []
    with Store.open(db) as again:  # a second open finds it at head and changes nothing
        assert again.revision == HEAD


def test_revision_1_is_the_schema_the_first_release_wrote(db: str) -> None:
    migrate(db, schema_revisions()[1])
    with connect(db) as conn:
        assert schema_differences(conn, V1) == []
        assert conn.execute(select(V1.tables["meta"].c.value)).scalar_one() == "1"


@pytest.mark.parametrize("with_alembic", [False, True], ids=["before-alembic", "alembic-stamped"])
def test_a_version_1_database_keeps_its_data_through_the_upgrade(db: str, clock: Clock, with_alembic: bool) -> None:
    version_1_database(db, with_alembic)
    facts = PROFILES["t4-16gb"].facts()
    release = manifest("int8")
    rollout = start("ro-1", RolloutSpec("r1", selector={"site": "a"}), {}, {}, 990.0)
    node = {
        "labels": {}, "facts": None, "artifact": None, "reported_generation": 0, "desired_generation": 0,
        "desired_artifact": None, "ready": False, "health": None, "failed_generation": 0, "error": None,
        "online": True, "bd_seq": 1, "last_seen": 995.0,
    }  # fmt: skip
    tables = V1.tables
    with connect(db) as conn:
        conn.execute(tables["nodes"].insert(), [
            {**node, "id": "n1", "labels": {"site": "a"}, "facts": facts.to_dict(), "artifact": "a" * 64,
             "reported_generation": 3, "desired_generation": 4, "desired_artifact": "b" * 64, "ready": True,
             "health": "ready", "failed_generation": 4, "error": "disk full"},
            {**node, "id": "n2"},
            {**node, "id": "n3", "online": False},
        ])  # fmt: skip
        conn.execute(tables["releases"].insert().values(name="r1", created=900.0))
        conn.execute(
            tables["release_variants"]
            .insert()
            .values(
                release="r1",
                variant="int8",
                artifact_id=artifact_id(release),
                bytes=release.weight_bytes,
                url=None,
                manifest=release.model_dump(mode="json"),
            )
        )
        conn.execute(
            tables["rollouts"]
            .insert()
            .values(
                id="ro-1",
                release="r1",
                spec=rollout.spec.to_dict(),
                state=rollout.to_dict(),
                status=str(rollout.status),
                created=990.0,
                updated=990.0,
            )
        )
        columns = ("node", "seq", "kind", "received_at", "payload")
        conn.execute(tables["telemetry"].insert(), [dict(zip(columns, row, strict=True)) for row in [
            # n1: a bad sample, then a better one (the latest, which version 1's gates judged), then an event.
            ("n1", 1, "telemetry", 991.0, agent_sample(1, 0.5, 4000.0)),
            ("n1", 2, "telemetry", 992.0, agent_sample(2, 0.2, 900.0)),
            ("n1", 3, "events", 993.0, {"kind": "swap"}),
            # n2: its agent did not answer; "ghost": telemetry of a node with no row.
            ("n2", 7, "telemetry", 994.0, {"seq": 7, "agent": None}),
            ("ghost", 1, "telemetry", 994.5, agent_sample(1, 0, 1)),
        ]])  # fmt: skip
        conn.execute(tables["telemetry_gaps"].insert().values(node="n1", first_seq=5, last_seq=6))
        conn.execute(tables["acks"].insert(), [{"node": "n1", "seq": 3}, {"node": "n2", "seq": 7}])
        conn.execute(tables["drops"].insert().values(source="n1", reason="outbox_overflow", dropped=2))

    with Store.open(db, clock=clock) as store:
        assert (store.revision, store.schema_version) == (HEAD, SCHEMA_VERSION)
        n1, n2, n3 = store.list_nodes()
        assert (n1.labels, n1.facts, n1.artifact, n1.reported_generation, n1.desired_generation) == (
            {"site": "a"},
            facts,
            "a" * 64,
            3,
            4,
        )
        assert (n1.failed_generation, n1.error, n1.online, n1.bd_seq, n1.last_seen) == (4, "disk full", True, 1, 995.0)
        # The new columns: the latest telemetry sample as version 1 judged it (events aside).
        assert n1.telemetry == Telemetry(at=992.0, error_rate=0.2, p95_ms=900.0)
        assert n2.telemetry == Telemetry(at=994.0, error_rate=None, p95_ms=None)
        assert n3.telemetry is None
        with store.engine.begin() as conn:
            seqs = dict(conn.execute(select(schema_module.nodes.c.id, schema_module.nodes.c.telemetry_seq)).all())
        assert seqs == {"n1": 2, "n2": 7, "n3": None}
        assert store.get_node("ghost") is None
        stored = store.get_release("r1")
        assert stored is not None
        assert stored.variant("int8").artifact_id == artifact_id(release)  # type: ignore[union-attr]
        assert store.load_rollout("ro-1") == rollout
        assert (store.telemetry_count(), store.telemetry_count("n1", kind="events")) == (5, 1)
        assert (store.ack_watermark("n1"), store.ack_watermark("n2")) == (3, 7)
        assert store.drop_counts() == {("n1", "outbox_overflow"): 2}
        # And it carries on as a version 2 store: 4 arrives, the declared gap 5..6 is passed, worst kept.
        moved = store.ingest([TelemetrySample("n1", 4, agent_sample(4, 0.1, 950.0))])
        assert moved.acks == {"n1": 6}
        assert store.get_node("n1").telemetry == Telemetry(at=clock.now, error_rate=0.2, p95_ms=950.0)  # type: ignore[union-attr]


def test_a_version_2_database_from_before_alembic_is_stamped_as_it_is(db: str) -> None:
    """What the last release without Alembic wrote: version 2's tables (today's but ``leases``, which
    version 3 added), ``meta`` at 2."""
    with connect(db) as conn:
        metadata.create_all(conn, tables=[table for table in metadata.sorted_tables if table.name != "leases"])
        conn.execute(schema_module.meta.insert().values(key="schema_version", value="2"))
        conn.execute(
            schema_module.nodes.insert().values(
                id="n1",
                labels={},
                reported_generation=1,
                desired_generation=1,
                ready=True,
                failed_generation=0,
                online=True,
                telemetry_seq=9,
                telemetry_at=5.0,
                worst_error_rate=0.3,
                worst_p95_ms=None,
            )
        )
    with Store.open(db) as store:
        assert store.revision == HEAD
        assert store.get_node("n1").telemetry == Telemetry(at=5.0, error_rate=0.3, p95_ms=None)  # type: ignore[union-attr]


def test_a_downgrade_to_1_and_back_keeps_the_nodes(db: str) -> None:
    with Store.open(db) as store:
        store.record_birth("n1", bd_seq=1)
        store.ingest([TelemetrySample("n1", 1, agent_sample(1, 0.05, 700.0))])
    with connect(db) as conn:
        command.downgrade(alembic_config(conn), schema_revisions()[1])
        assert schema_differences(conn, V1) == []
        assert conn.execute(select(V1.tables["meta"].c.value)).scalar_one() == "1"
    with Store.open(db) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.get_node("n1").telemetry == Telemetry(at=store.latest_telemetry("n1").received_at,  # type: ignore[union-attr]
                                                           error_rate=0.05, p95_ms=700.0)  # fmt: skip


def test_a_database_at_a_revision_this_code_does_not_have_is_refused_untouched(db: str) -> None:
    Store.open(db).close()
    with connect(db) as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaVersionError, match="revision 0099, which this zimage-edge does not have"):
        Store.open(db)
    with connect(db) as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0099"


def test_a_newer_schema_version_in_meta_is_refused_before_alembic_looks(db: str) -> None:
    """A release after this one bumps ``meta`` in its revision: this code says so, whatever Alembic holds."""
    Store.open(db).close()
    with connect(db) as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
        conn.execute(update(schema_module.meta).values(value=str(SCHEMA_VERSION + 1)))
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}, newer than"):
        Store.open(db)


def test_a_version_without_a_migration_is_refused(db: str) -> None:
    with connect(db) as conn:
        V1.tables["meta"].create(conn)
        conn.execute(V1.tables["meta"].insert().values(key="schema_version", value="0"))
    with pytest.raises(SchemaVersionError, match=r"schema version 0, older than .* no migration from it"):
        Store.open(db)


def test_a_meta_table_without_a_version_is_not_a_fleet_store(db: str) -> None:
    with connect(db) as conn:
        V1.tables["meta"].create(conn)
    with pytest.raises(StoreError, match="meta table without a schema version"):
        Store.open(db)


@contextmanager
def migration_lock_held(db: str) -> Iterator[None]:
    """Hold what ``Store.open`` takes before it migrates, from another connection (another replica)."""
    engine = create_engine(database_url(db), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": schema_module.MIGRATION_LOCK_KEY})
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield
            conn.rollback()
    finally:
        engine.dispose()


def test_an_open_waits_for_another_replicas_migration_lock(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Store.open(db).close()  # the file exists (SQLite), so that a lock on it can be held
    monkeypatch.setattr(schema_module, "MIGRATION_LOCK_TIMEOUT_S", 0.05)
    monkeypatch.setattr(schema_module, "SQLITE_BUSY_TIMEOUT_MS", 50)
    with migration_lock_held(db), pytest.raises(StoreError, match="holds the store's migration lock"):
        Store.open(db)
    with Store.open(db) as store:  # released: it opens
        assert store.revision == HEAD


def _open_replica(db: str, barrier: Any) -> None:
    """A controller replica starting: wait for the others, then open the store (exit status 1: it failed)."""
    barrier.wait(timeout=REPLICA_START_TIMEOUT_S)
    Store.open(db).close()


def test_replicas_starting_at_once_on_an_empty_database_migrate_it_once(db: str) -> None:
    """Processes, as replicas are: the database's own lock is all that keeps them apart."""
    context = multiprocessing.get_context("fork")  # fork: a replica in milliseconds, no re-import
    barrier = context.Barrier(REPLICAS)
    replicas = [context.Process(target=_open_replica, args=(db, barrier)) for _ in range(REPLICAS)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(REPLICA_START_TIMEOUT_S)
    assert [replica.exitcode for replica in replicas] == [0] * REPLICAS
    with connect(db) as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
        assert schema_differences(conn, metadata) == []


def test_stores_opened_at_once_in_one_process_do_not_mix_their_migrations(
    make_store_database: Callable[[], str],
) -> None:
    """Alembic's ``op`` and ``context`` are process-wide: threads opening stores must take turns."""
    databases = [make_store_database() for _ in range(REPLICAS)]
    barrier = threading.Barrier(REPLICAS)

    def open_store(db: str) -> None:
        barrier.wait(timeout=REPLICA_START_TIMEOUT_S)
        Store.open(db).close()

    with ThreadPoolExecutor(REPLICAS) as pool:
        for opened in [pool.submit(open_store, db) for db in databases]:
            opened.result()  # raises what the thread raised
    for db in databases:
        with connect(db) as conn:
            assert schema_differences(conn, metadata) == []


def test_json_columns_are_jsonb_on_postgresql(postgres_url: str) -> None:
    Store.open(postgres_url).close()
    with connect(postgres_url) as conn:
        columns = {column["name"]: column["type"] for column in inspect(conn).get_columns("telemetry")}
    assert isinstance(columns["payload"], postgresql.JSONB)


def test_the_controller_config_opens_a_store_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """``fleet controller --config`` passes ``database`` to ``Store.open``; a plain ``postgresql://`` URL
    (no driver named) means psycopg 3, the driver installed, not SQLAlchemy's default psycopg2."""
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    for url in (postgres_url, plain):
        config = tmp_path / "controller.toml"
        config.write_text(f'database = "{url}"\napi_token = "secret"\n')
        settings = ControllerSettings.model_validate(tomllib.loads(config.read_text()))
        with Store.open(settings.database) as store:
            assert (store.engine.dialect.name, store.engine.driver) == ("postgresql", "psycopg")
            store.record_birth("n1", bd_seq=1)
            assert [node.id for node in store.list_nodes()] == ["n1"]
