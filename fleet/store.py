"""The controller's state in SQL, through SQLAlchemy Core: SQLite by default, PostgreSQL at scale.

Nothing here is SQLite-only: conflicts are resolved with ``INSERT ... ON CONFLICT`` built by the
dialect's own ``insert`` (SQLite and PostgreSQL spell it the same), comparisons use ``CASE`` rather than
``max()``/``greatest()``, and times are epoch seconds from the injected clock, not database functions.

The schema is migrated with Alembic (``fleet/migrations``, shipped in the package, run by ``Store.open``
without an ``alembic.ini``); see ``Store._prepare`` for what it does with the database it is given. The
``meta`` table keeps the schema version beside Alembic's ``alembic_version``: every revision sets it, so
a release that predates Alembic (which reads only ``meta``) still refuses a database newer than itself.

Batches of rows are written in key order (nodes by id, samples by node and seq): two controller replicas
writing overlapping batches to PostgreSQL then lock the rows they share in the same order, rather than
one being aborted as a deadlock (SQLite locks the whole file per transaction and never deadlocks).

Every method is blocking; an asyncio controller calls them from an executor, never on the event loop.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    MetaData,
    Row,
    String,
    Table,
    Text,
    case,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError

from fleet.rollout import NodeObservation, ReleaseVariant, RolloutState, RolloutStatus, Telemetry
from quantize.manifest import Manifest, artifact_id
from quantize.variants import VariantRecipe
from zimage_edge.device import DeviceFacts
from zimage_edge.errors import ZimageEdgeError

# The schema this code reads and writes: the ``schema_version`` of the head revision in fleet/migrations.
SCHEMA_VERSION = 3
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The PostgreSQL advisory lock that controller replicas starting together take around the migration, so
# that one migrates and the others then find the database at head. Any constant works as long as every
# release uses the same one: "zimage" in ASCII, then 1.
MIGRATION_LOCK_KEY = 0x7A696D616765_0001
# How long a replica waits for another's migration (and a migration for the table locks it needs) before
# giving up with an error: the migrations so far take well under a second on a fleet of a thousand nodes;
# a minute means something holds the lock that should not, and a restart is better than a silent hang.
MIGRATION_LOCK_TIMEOUT_S = 60
# A lock held longer than this by another writer (a CLI command beside the running controller) is an
# error rather than a hang; the controller's own writes (a telemetry batch, a rollout state) commit in
# milliseconds, so five seconds of waiting means something is stuck.
SQLITE_BUSY_TIMEOUT_MS = 5000
# Rows read per query while walking the ack watermark over a node's backlog: a node back from an
# outage of hours at one message per second brings thousands; chunks keep the walk's memory flat.
ACK_SCAN_CHUNK = 1000
# Node ids and release names are MQTT topic levels and CLI arguments: short human names, never long.
NAME_LENGTH = 128
ARTIFACT_ID_LENGTH = 64  # hex sha256 of the manifest

# JSONB on PostgreSQL (indexable, compact); SQLite stores JSON as text. Either round-trips exactly.
JSONValue = JSON().with_variant(postgresql.JSONB(), "postgresql")

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(NAME_LENGTH), primary_key=True),
    Column("labels", JSONValue, nullable=False),
    Column("facts", JSONValue, nullable=True),  # DeviceFacts.to_dict, as the node reported it
    Column("artifact", String(ARTIFACT_ID_LENGTH), nullable=True),  # running now
    Column("reported_generation", BigInteger, nullable=False),
    # What the controller last published: new generations go above it, even after a restart.
    Column("desired_generation", BigInteger, nullable=False),
    Column("desired_artifact", String(ARTIFACT_ID_LENGTH), nullable=True),
    Column("ready", Boolean, nullable=False),
    Column("health", Text, nullable=True),  # the agent's own word on its state
    Column("failed_generation", BigInteger, nullable=False),  # the highest generation it gave up on
    Column("error", Text, nullable=True),  # why it did not apply its desired state
    Column("online", Boolean, nullable=False),
    Column("bd_seq", BigInteger, nullable=True),  # the birth/death sequence of its current connection
    Column("last_seen", Float, nullable=True),
    # What the rollout gates read, kept on the row so that stepping a rollout over a thousand nodes is
    # one query, not one per node: the latest telemetry sample (highest seq) and when it came, and the
    # worst error rate and p95 of every sample since the node last applied a desired generation or
    # changed artifact. Worst, not latest: a bad sample followed by good ones before the next rollout
    # step is still judged; since the change: what the node ran before does not count against the new.
    Column("telemetry_seq", BigInteger, nullable=True),
    Column("telemetry_at", Float, nullable=True),  # when the controller received it
    Column("worst_error_rate", Float, nullable=True),
    Column("worst_p95_ms", Float, nullable=True),
)

releases = Table(
    "releases",
    metadata,
    Column("name", String(NAME_LENGTH), primary_key=True),
    Column("created", Float, nullable=False),
)

release_variants = Table(
    "release_variants",
    metadata,
    Column("release", String(NAME_LENGTH), ForeignKey("releases.name"), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("artifact_id", String(ARTIFACT_ID_LENGTH), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("url", Text, nullable=True),  # None: served by the controller's artifact server
    Column("manifest", JSONValue, nullable=False),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(NAME_LENGTH), primary_key=True),
    Column("release", String(NAME_LENGTH), ForeignKey("releases.name"), nullable=False),
    # The operator's request, readable without decoding the progress; ``state`` (which embeds the same
    # spec) is what ``load_rollout`` reads.
    Column("spec", JSONValue, nullable=False),
    Column("state", JSONValue, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Index("rollouts_status", "status"),
)

# Everything a node sends through its outbox: telemetry and events share one per-node ``seq``, so both
# live here (``kind`` tells them apart) and the ack watermark covers both. The primary key is the
# deduplication: a message redelivered (QoS 1, an outbox resent after a lost ack, a second controller
# replica) is stored once.
telemetry = Table(
    "telemetry",
    metadata,
    Column("node", String(NAME_LENGTH), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("kind", String(16), nullable=False),  # the topic it came on: "telemetry" or "events"
    Column("received_at", Float, nullable=False),
    Column("payload", JSONValue, nullable=False),
)

# Seq ranges a node dropped from its outbox on overflow (oldest telemetry first, events kept): they
# will never arrive, and the ack watermark steps over them instead of waiting for ever.
telemetry_gaps = Table(
    "telemetry_gaps",
    metadata,
    Column("node", String(NAME_LENGTH), primary_key=True),
    Column("first_seq", BigInteger, primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
)

# The highest seq below which every sample of the node is stored (or known lost): what the node may
# delete from its outbox. Kept apart from the telemetry rows so that pruning old rows keeps it.
acks = Table(
    "acks",
    metadata,
    Column("node", String(NAME_LENGTH), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

# Named leases: who holds one and until when (on the holder's clock; replicas need synchronised clocks,
# which a lease of several ticks tolerates by seconds). One replica at a time drives the rollouts.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(NAME_LENGTH), nullable=False),
    Column("expires_at", Float, nullable=False),
)

drops = Table(
    "drops",
    metadata,
    Column("source", String(NAME_LENGTH), primary_key=True),  # "controller" or the node that dropped
    Column("reason", String(64), primary_key=True),
    Column("dropped", BigInteger, nullable=False),
)

# Alembic's ``context`` and ``op`` are process-wide proxies of the migration running now: two stores
# migrating in one process at once (threads) would run each other's operations. One at a time.
_MIGRATING = threading.Lock()

# The dialects whose ``insert`` has ``on_conflict_do_nothing``/``_do_update``.
_INSERTS: dict[str, Callable[[Table], Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class StoreError(ZimageEdgeError):
    """The database cannot be used as the controller's store, or a write contradicts what it holds."""


class SchemaVersionError(StoreError):
    """The database was written with another schema version."""


@dataclass(frozen=True)
class NodeRecord:
    id: str
    labels: dict[str, str]
    facts: DeviceFacts | None
    artifact: str | None
    reported_generation: int
    desired_generation: int
    desired_artifact: str | None
    ready: bool
    health: str | None
    failed_generation: int
    error: str | None
    online: bool
    bd_seq: int | None
    last_seen: float | None
    # When its latest telemetry came, with the worst gate readings since it last changed what it runs.
    telemetry: Telemetry | None = None

    def observation(self) -> NodeObservation:
        """The node as the rollout state machine sees it, with its latest telemetry."""
        return NodeObservation(
            node=self.id,
            labels=dict(self.labels),
            online=self.online,
            reported_generation=self.reported_generation,
            desired_generation=self.desired_generation,
            artifact=self.artifact,
            ready=self.ready,
            failed_generation=self.failed_generation,
            error=self.error,
            telemetry=self.telemetry,
            last_seen=self.last_seen,
        )


@dataclass(frozen=True)
class ReleaseVariantRecord:
    release: str
    variant: str
    artifact_id: str
    bytes: int
    url: str | None
    manifest: Manifest

    def release_variant(self) -> ReleaseVariant:
        """What ``fleet.rollout.choose_variant`` needs: the recipe the artifact was made with, and its size."""
        recipe = VariantRecipe.from_dict(self.manifest.variant.model_dump(mode="json"))
        return ReleaseVariant(recipe, self.artifact_id, self.bytes)


@dataclass(frozen=True)
class ReleaseRecord:
    name: str
    created: float
    variants: tuple[ReleaseVariantRecord, ...] = ()

    def variant(self, name: str) -> ReleaseVariantRecord | None:
        return next((variant for variant in self.variants if variant.variant == name), None)


TELEMETRY = "telemetry"  # the kind of a telemetry sample; an event's is "events"


@dataclass(frozen=True)
class TelemetrySample:
    """One message from a node's outbox."""

    node: str
    seq: int  # per node, from 1, never reused (the node's outbox keeps it across restarts)
    payload: Mapping[str, Any]  # the validated message as JSON (the protocol's model, dumped)
    kind: str = TELEMETRY


@dataclass(frozen=True)
class Gap:
    """Seqs ``first..last`` (inclusive) a node dropped from its outbox: they will never come."""

    node: str
    first: int
    last: int


@dataclass(frozen=True)
class Failure:
    """The node gave up on a desired generation (its failed event) and serves what it had."""

    node: str
    generation: int
    error: str


@dataclass(frozen=True)
class Ingested:
    """What one ``Store.ingest`` did."""

    new: int  # samples stored
    duplicates: int  # samples already stored (redelivered), not stored again
    acks: dict[str, int]  # node -> its ack watermark, for the nodes whose watermark moved


@dataclass(frozen=True)
class TelemetryRecord:
    node: str
    seq: int
    kind: str
    received_at: float
    payload: dict[str, Any]


# URL schemes that name PostgreSQL without a driver: SQLAlchemy would pick psycopg2, which is not
# installed; psycopg 3 is (pyproject.toml). ``postgres://`` is what Heroku-style settings give.
_POSTGRESQL_SCHEMES = ("postgresql", "postgres")


def database_url(database: str | Path) -> str:
    """A SQLAlchemy URL as given (``postgresql://`` meaning psycopg 3), or a SQLite URL for a file path."""
    text = str(database)
    if "://" not in text:
        return f"sqlite:///{Path(text)}"
    url = make_url(text)
    if url.drivername in _POSTGRESQL_SCHEMES:
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's configuration for the store's migrations, without an ``alembic.ini``: run on
    ``connection`` (inside its transaction), or on ``url`` (``alembic`` commands run by hand)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", database_url(url).replace("%", "%%"))  # configparser syntax
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def schema_revisions(script: ScriptDirectory | None = None) -> dict[int, str]:
    """Schema version -> the Alembic revision that makes it, from each revision's ``schema_version``."""
    script = script or ScriptDirectory.from_config(alembic_config())
    return {revision.module.schema_version: revision.revision for revision in script.walk_revisions()}


def _json_dumps(value: Any) -> str:
    """JSON for the JSON columns, on every engine alike: a non-finite float (a sensor's NaN) becomes null.

    PostgreSQL's JSONB refuses ``NaN`` and ``Infinity`` (they are not JSON), and one such value would fail
    the whole batch it came in; SQLite stored them as text its own JSON functions reject. null is what
    pydantic's JSON mode writes for them too.
    """
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _checked_name(what: str, name: str) -> str:
    """Names are primary keys of ``NAME_LENGTH`` characters: PostgreSQL refuses a longer one mid-write, and
    SQLite would keep it; refuse it up front on both, as a ``StoreError`` the API reports as a bad request."""
    if not 0 < len(name) <= NAME_LENGTH:
        raise StoreError(f"a {what} name has 1-{NAME_LENGTH} characters, not {len(name)}")
    return name


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # First, so that every statement after it waits for another writer's lock instead of failing.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # Foreign keys are off by default in SQLite and always on in PostgreSQL: behave the same.
        cursor.execute("PRAGMA foreign_keys=ON")
        # synchronous stays FULL (the default): an ack tells a node it may delete its copy, so a
        # committed sample must survive a power cut, which WAL's NORMAL does not promise.
    finally:
        cursor.close()


def _use_wal(engine: Engine) -> None:
    """Put the SQLite file in WAL mode: readers (the CLI, the status page) never block the ingest, nor it them.

    The mode is kept in the file, so this changes something once per database. Switching needs the file's
    exclusive lock, and SQLite answers "database is locked" at once, without waiting out the busy timeout,
    when waiting could deadlock (another connection holds the write lock: a replica starting at the same
    moment, in the middle of its migration). So it is asked again, with backoff, up to the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay_s = 0.005
    while True:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            return
        except OperationalError as exc:
            if "locked" not in str(exc.orig) or time.monotonic() + delay_s > deadline:
                where = engine.url.render_as_string()
                raise StoreError(f"{where}: could not switch the database to WAL mode: {exc.orig}") from exc
        time.sleep(delay_s)  # no event to wait on: another process holds a file lock
        delay_s = min(delay_s * 2, 0.2)


def _facts_from_json(data: Mapping[str, Any] | None) -> DeviceFacts | None:
    return DeviceFacts.from_dict(data) if data is not None else None


class Store:
    """The controller's nodes, releases, rollouts and telemetry. Open it with ``Store.open``."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        dialect = engine.dialect.name
        if dialect not in _INSERTS:
            raise StoreError(f"unsupported database {dialect!r}; the store runs on {', '.join(_INSERTS)}")
        self.engine = engine
        self._clock = clock
        self._insert = _INSERTS[dialect]
        self._prepare()

    @classmethod
    def open(cls, database: str | Path, clock: Callable[[], float] = time.time) -> Store:
        """Open (and create, if new) the store at a file path or a database URL."""
        engine = create_engine(database_url(database), json_serializer=_json_dumps)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        try:
            if engine.dialect.name == "sqlite":
                _use_wal(engine)
            return cls(engine, clock)
        except BaseException:
            engine.dispose()  # a refused database: close the pool's connections, not leave them to GC
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _prepare(self) -> None:
        """Bring the database to this code's schema, in one transaction under the migration lock.

        - empty: every migration, from the first (revision 0001 makes schema version 1);
        - at an Alembic revision this code knows: the migrations after it, keeping the data;
        - written before Alembic (``meta`` says version 1 or 2, no ``alembic_version``): stamped at the
          revision of that version, then upgraded like the above;
        - a ``meta`` version or an Alembic revision newer than this code: ``SchemaVersionError``, nothing
          changed (it was written by a newer release);
        - tables but no ``meta``: ``StoreError``, not a fleet store.

        Several replicas opening one database at once: on PostgreSQL each takes an advisory lock
        (``MIGRATION_LOCK_KEY``) first, so one migrates and the rest find it done; on SQLite the
        transaction begins ``IMMEDIATE``, taking the file's write lock before it looks at anything.
        Within one process, stores are prepared one at a time (``_MIGRATING``).
        """
        with _MIGRATING, self.engine.begin() as conn:
            self._lock_for_migration(conn)
            config = alembic_config(conn)
            script = ScriptDirectory.from_config(config)
            existing = set(inspect(conn).get_table_names())
            if existing:
                self._adopt(conn, config, script, existing)
            command.upgrade(config, "head")

    def _lock_for_migration(self, conn: Connection) -> None:
        """Serialise ``_prepare`` across processes; held until the transaction ends."""
        where = self.engine.url.render_as_string()
        try:
            if self.engine.dialect.name == "postgresql":
                # SET LOCAL: for this transaction only, advisory lock and the migrations' table locks alike.
                timeout = f"{round(MIGRATION_LOCK_TIMEOUT_S * 1000)}ms"
                conn.execute(select(func.set_config("lock_timeout", timeout, True)))
                conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            else:
                # pysqlite begins transactions lazily, at the first write; a migrator that looked first
                # and wrote later could race another one. BEGIN IMMEDIATE takes the write lock now (and
                # waits up to the busy timeout for it). Readers in WAL mode are not blocked.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        except OperationalError as exc:
            raise StoreError(
                f"{where}: another process holds the store's migration lock (another controller starting, "
                f"or a long write); gave up waiting: {exc.orig}"
            ) from exc

    def _adopt(self, conn: Connection, config: Config, script: ScriptDirectory, existing: set[str]) -> None:
        """Check a database that holds tables, and stamp one written before Alembic at its revision."""
        where = self.engine.url.render_as_string()
        if "meta" not in existing:
            raise StoreError(
                f"{where} holds tables ({', '.join(sorted(existing))}) "
                "but no zimage-edge schema version: not a fleet store; give another database"
            )
        found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one_or_none()
        if found is None:
            raise StoreError(f"{where} has a meta table without a schema version: not a fleet store")
        version = int(found)
        self._check_version(version)
        current = MigrationContext.configure(conn).get_current_heads()
        known = {revision.revision for revision in script.walk_revisions()}
        if unknown := [revision for revision in current if revision not in known]:
            raise SchemaVersionError(
                f"{where} is at migration revision {', '.join(unknown)}, which this zimage-edge does not have: "
                "it was written by a newer release; upgrade zimage-edge to use it"
            )
        if current:
            return
        revisions = schema_revisions(script)
        if version not in revisions:
            raise SchemaVersionError(
                f"{where} has schema version {version}, older than this zimage-edge's {SCHEMA_VERSION}, "
                "and this release has no migration from it"
            )
        command.stamp(config, revisions[version])

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.engine.url.render_as_string()} has schema version {version}, newer than this "
                f"zimage-edge's {SCHEMA_VERSION}: it was written by a newer release; upgrade zimage-edge to use it"
            )

    @property
    def schema_version(self) -> int:
        """The schema version the ``meta`` table records."""
        with self.engine.begin() as conn:
            return int(conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one())

    @property
    def revision(self) -> str | None:
        """The Alembic revision the database is at (``None``: not migrated by Alembic)."""
        with self.engine.begin() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # Nodes.

    @staticmethod
    def _node_defaults() -> dict[str, Any]:
        """A node's columns before it has said anything about them."""
        return {
            "labels": {}, "facts": None, "artifact": None, "reported_generation": 0, "desired_generation": 0,
            "desired_artifact": None, "ready": False, "health": None, "failed_generation": 0, "error": None,
            "online": False, "bd_seq": None, "last_seen": None, "telemetry_seq": None, "telemetry_at": None,
            "worst_error_rate": None, "worst_p95_ms": None,
        }  # fmt: skip

    def _upsert_node(self, conn: Connection, node: str, values: Mapping[str, Any]) -> None:
        """Insert the node with defaults for what ``values`` does not say, or update what it says."""
        statement = self._insert(nodes).values(id=node, **{**self._node_defaults(), **values})
        conn.execute(statement.on_conflict_do_update(index_elements=[nodes.c.id], set_=dict(values)))

    def record_birth(self, node: str, bd_seq: int) -> None:
        """The node connected: online, with this birth/death sequence."""
        with self.engine.begin() as conn:
            self._upsert_node(conn, node, {"online": True, "bd_seq": bd_seq, "last_seen": self._clock()})

    def record_death(self, node: str, bd_seq: int) -> bool:
        """The node's will (or clean stop): offline, unless ``bd_seq`` is not its current connection's.

        Returns whether it applied: a late will of an earlier connection must not mark a reborn node
        offline; with no birth seen (a retained death on a fresh subscription) the death applies. The
        rule of ``fleet.protocol.state_decision``, checked inside the statements themselves so that it
        holds with several controller replicas writing at once.
        """
        with self.engine.begin() as conn:
            inserted = conn.execute(
                self._insert(nodes)
                .values(id=node, **{**self._node_defaults(), "bd_seq": bd_seq})
                .on_conflict_do_nothing(index_elements=[nodes.c.id])
                .returning(nodes.c.id)
            ).first()
            if inserted is not None:
                return True
            current = or_(nodes.c.bd_seq.is_(None), nodes.c.bd_seq == bd_seq)
            result = conn.execute(update(nodes).where(nodes.c.id == node, current).values(online=False))
            return result.rowcount == 1

    def record_reported(
        self,
        node: str,
        *,
        generation: int,
        artifact: str | None,
        ready: bool,
        health: str | None = None,
        error: str | None = None,
        facts: DeviceFacts | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """What the node says it runs (its retained ``reported``)."""
        values: dict[str, Any] = {
            "reported_generation": generation, "artifact": artifact, "ready": ready, "health": health,
            "error": error,
        }  # fmt: skip
        if facts is not None:
            values["facts"] = facts.to_dict()
        if labels is not None:
            values["labels"] = dict(labels)
        statement = self._insert(nodes).values(id=node, **{**self._node_defaults(), **values})
        new = statement.excluded
        # A new generation applied or another artifact running starts the gate readings afresh.
        changed = or_(
            nodes.c.reported_generation != new.reported_generation, nodes.c.artifact.is_distinct_from(new.artifact)
        )
        set_: dict[str, Any] = {**{key: new[key] for key in values}}
        set_["worst_error_rate"] = case((changed, None), else_=nodes.c.worst_error_rate)
        set_["worst_p95_ms"] = case((changed, None), else_=nodes.c.worst_p95_ms)
        with self.engine.begin() as conn:
            conn.execute(statement.on_conflict_do_update(index_elements=[nodes.c.id], set_=set_))

    def record_failure(self, node: str, generation: int, error: str) -> None:
        """The node gave up on ``generation`` (its failed event says why) and serves what it had."""
        with self.engine.begin() as conn:
            self._record_failure(conn, Failure(node, generation, error))

    def _record_failure(self, conn: Connection, failure: Failure) -> None:
        statement = self._insert(nodes).values(
            id=failure.node,
            **{**self._node_defaults(), "failed_generation": failure.generation, "error": failure.error},
        )
        # An older failure arriving late (outbox order across a reconnect) must not hide a newer one.
        newer = statement.excluded.failed_generation > nodes.c.failed_generation
        set_ = {
            "failed_generation": case((newer, statement.excluded.failed_generation), else_=nodes.c.failed_generation),
            "error": case((newer, statement.excluded.error), else_=nodes.c.error),
        }
        conn.execute(statement.on_conflict_do_update(index_elements=[nodes.c.id], set_=set_))

    def record_desired(self, node: str, generation: int, artifact: str | None) -> None:
        """What the controller published to the node's ``desired``, so generations only grow."""
        self.record_desired_many([(node, generation, artifact)])

    def record_desired_many(self, desired: Sequence[tuple[str, int, str | None]]) -> None:
        """``record_desired`` for many nodes, in one transaction."""
        if not desired:
            return
        rows = [
            {"id": node, **self._node_defaults(), "desired_generation": generation, "desired_artifact": artifact}
            for node, generation, artifact in sorted(desired, key=lambda row: row[0])  # stable: the last wins
        ]
        statement = self._insert(nodes)
        set_ = {"desired_generation": statement.excluded.desired_generation,
                "desired_artifact": statement.excluded.desired_artifact}  # fmt: skip
        with self.engine.begin() as conn:
            conn.execute(statement.on_conflict_do_update(index_elements=[nodes.c.id], set_=set_), rows)

    def get_node(self, node: str) -> NodeRecord | None:
        with self.engine.begin() as conn:
            row = conn.execute(select(nodes).where(nodes.c.id == node)).one_or_none()
        return _node_record(row) if row is not None else None

    def list_nodes(self) -> list[NodeRecord]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(nodes).order_by(nodes.c.id)).all()
        return [_node_record(row) for row in rows]

    # Releases.

    def add_release(
        self, name: str, manifests: Sequence[Manifest], urls: Mapping[str, str] | None = None
    ) -> ReleaseRecord:
        """Register a release: variants of one model version, one artifact each. Releases never change.

        ``urls`` gives an external URL per variant name; a variant without one is served by the
        controller's artifact server.
        """
        _checked_name("release", name)
        urls = dict(urls or {})
        by_variant = {manifest.variant_name: manifest for manifest in manifests}
        if not manifests:
            raise StoreError(f"release {name!r} has no artifacts")
        if len(by_variant) != len(manifests):
            raise StoreError(f"release {name!r} has two artifacts of the same variant")
        sources = {(manifest.model_id, manifest.source.sha256) for manifest in manifests}
        if len(sources) > 1:
            raise StoreError(f"release {name!r} mixes artifacts of different models: {sorted(sources)}")
        if unknown := set(urls) - set(by_variant):
            raise StoreError(f"release {name!r}: URLs given for variants it does not have: {sorted(unknown)}")
        created = self._clock()
        records = tuple(
            ReleaseVariantRecord(
                name, variant, artifact_id(manifest), manifest.weight_bytes, urls.get(variant), manifest
            )
            for variant, manifest in sorted(by_variant.items())
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(releases.insert().values(name=name, created=created))
                conn.execute(
                    release_variants.insert(),
                    [
                        {
                            "release": name, "variant": record.variant, "artifact_id": record.artifact_id,
                            "bytes": record.bytes, "url": record.url,
                            "manifest": record.manifest.model_dump(mode="json"),
                        }
                        for record in records
                    ],
                )  # fmt: skip
        except IntegrityError as exc:
            raise StoreError(f"release {name!r} already exists; releases never change, publish a new one") from exc
        return ReleaseRecord(name, created, records)

    def get_release(self, name: str) -> ReleaseRecord | None:
        found = self._releases(releases.c.name == name)
        return found[0] if found else None

    def release_count(self) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(select(func.count()).select_from(releases)).scalar_one())

    def list_releases(self) -> list[ReleaseRecord]:
        return self._releases(None)

    def _releases(self, where: ColumnElement[bool] | None) -> list[ReleaseRecord]:
        query = select(releases).order_by(releases.c.created, releases.c.name)
        variants_query = select(release_variants).order_by(release_variants.c.release, release_variants.c.variant)
        if where is not None:
            query = query.where(where)
            variants_query = variants_query.where(release_variants.c.release.in_(select(releases.c.name).where(where)))
        with self.engine.begin() as conn:
            release_rows = conn.execute(query).all()
            variant_rows = conn.execute(variants_query).all()
        variants: dict[str, list[ReleaseVariantRecord]] = {}
        for row in variant_rows:
            variants.setdefault(row.release, []).append(
                ReleaseVariantRecord(
                    row.release, row.variant, row.artifact_id, row.bytes, row.url, Manifest.model_validate(row.manifest)
                )
            )
        return [ReleaseRecord(row.name, row.created, tuple(variants.get(row.name, ()))) for row in release_rows]

    # Rollouts.

    def save_rollout(self, state: RolloutState) -> None:
        """Insert or update the rollout (the controller saves after every step that changed it)."""
        _checked_name("rollout", state.id)
        now = self._clock()
        values = {
            "release": state.spec.release, "spec": state.spec.to_dict(), "state": state.to_dict(),
            "status": str(state.status), "updated": now,
        }  # fmt: skip
        statement = self._insert(rollouts).values(id=state.id, created=now, **values)
        try:
            with self.engine.begin() as conn:
                conn.execute(statement.on_conflict_do_update(index_elements=[rollouts.c.id], set_=values))
        except IntegrityError as exc:
            raise StoreError(f"rollout {state.id}: release {state.spec.release!r} is not registered") from exc

    def load_rollout(self, rollout_id: str) -> RolloutState | None:
        with self.engine.begin() as conn:
            data = conn.execute(select(rollouts.c.state).where(rollouts.c.id == rollout_id)).scalar_one_or_none()
        return RolloutState.from_dict(data) if data is not None else None

    def list_rollouts(self, statuses: Collection[RolloutStatus] | None = None) -> list[RolloutState]:
        """Rollouts, oldest first; ``statuses`` narrows them (e.g. the active ones a restart resumes)."""
        query = select(rollouts.c.state).order_by(rollouts.c.created, rollouts.c.id)
        if statuses is not None:
            query = query.where(rollouts.c.status.in_([str(status) for status in statuses]))
        with self.engine.begin() as conn:
            return [RolloutState.from_dict(data) for data in conn.execute(query).scalars()]

    # Telemetry.

    def record_telemetry(self, samples: Sequence[TelemetrySample]) -> int:
        """Store a batch in one transaction; returns how many samples were new (a duplicate is never stored)."""
        with self.engine.begin() as conn:
            return len(self._insert_samples(conn, samples, self._clock()))

    def ingest(
        self, samples: Sequence[TelemetrySample], gaps: Sequence[Gap] = (), failures: Sequence[Failure] = ()
    ) -> Ingested:
        """One batch of what nodes sent through their outboxes, in one transaction: the samples (each
        ``(node, seq)`` once), declared gaps, refusals, each node's latest telemetry, and the ack
        watermarks moved over what is now stored. Returns the watermarks that moved (to publish)."""
        received_at = self._clock()
        with self.engine.begin() as conn:
            inserted = self._insert_samples(conn, samples, received_at)
            for gap in gaps:
                self._record_gap(conn, gap)
            for failure in failures:
                self._record_failure(conn, failure)
            self._update_latest(conn, [s for s in samples if (s.node, s.seq) in inserted], received_at)
            moved = self._advance_acks(conn, {s.node for s in samples} | {g.node for g in gaps})
        return Ingested(new=len(inserted), duplicates=len(samples) - len(inserted), acks=moved)

    def _advance_acks(self, conn: Connection, touched: set[str]) -> dict[str, int]:
        """``_advance_ack`` for many nodes in a few queries (one batch touches up to every node of the
        fleet): their watermarks, their gaps above them, and up to ``ACK_SCAN_CHUNK`` stored seqs above
        them each; a node with more than that to walk takes the one-node path. Returns the moved ones."""
        if not touched:
            return {}
        names = sorted(touched)
        before = dict.fromkeys(names, 0)
        before.update(conn.execute(select(acks.c.node, acks.c.seq).where(acks.c.node.in_(names))).all())
        spans: dict[str, list[tuple[int, int]]] = {}
        above_ack = telemetry_gaps.c.last_seq > func.coalesce(acks.c.seq, 0)
        for node, first, last in conn.execute(
            select(telemetry_gaps.c.node, telemetry_gaps.c.first_seq, telemetry_gaps.c.last_seq)
            .select_from(telemetry_gaps.outerjoin(acks, acks.c.node == telemetry_gaps.c.node))
            .where(telemetry_gaps.c.node.in_(names), above_ack)
        ):
            spans.setdefault(node, []).append((first, last))
        rank = func.row_number().over(partition_by=telemetry.c.node, order_by=telemetry.c.seq).label("rank")
        above = (
            select(telemetry.c.node, telemetry.c.seq, rank)
            .select_from(telemetry.outerjoin(acks, acks.c.node == telemetry.c.node))
            .where(telemetry.c.node.in_(names), telemetry.c.seq > func.coalesce(acks.c.seq, 0))
            .subquery()
        )
        stored: dict[str, list[int]] = {}
        for node, seq in conn.execute(
            select(above.c.node, above.c.seq).where(above.c.rank <= ACK_SCAN_CHUNK).order_by(above.c.node, above.c.seq)
        ):
            stored.setdefault(node, []).append(seq)
        moved: dict[str, int] = {}
        for node in names:
            seqs = stored.get(node, [])
            if len(seqs) >= ACK_SCAN_CHUNK:
                _, after = self._advance_ack(conn, node)  # a long backlog: walk it in chunks
            else:
                after = _walk(before[node], seqs, spans.get(node, []))
            if after > before[node]:
                moved[node] = after
        if not moved:
            return {}
        statement = self._insert(acks)
        # Never backwards, even if another replica moved it further meanwhile.
        higher = case((acks.c.seq < statement.excluded.seq, statement.excluded.seq), else_=acks.c.seq)
        conn.execute(
            statement.on_conflict_do_update(index_elements=[acks.c.node], set_={"seq": higher}),
            [{"node": node, "seq": seq} for node, seq in sorted(moved.items())],
        )
        return dict(conn.execute(select(acks.c.node, acks.c.seq).where(acks.c.node.in_(moved))).all())

    def _insert_samples(
        self, conn: Connection, samples: Sequence[TelemetrySample], received_at: float
    ) -> set[tuple[str, int]]:
        """Insert the samples not stored yet; returns the ``(node, seq)`` of those inserted."""
        unique = {(sample.node, sample.seq): sample for sample in reversed(samples)}  # the first copy wins
        if not unique:
            return set()
        rows = [
            {
                "node": sample.node,
                "seq": sample.seq,
                "kind": sample.kind,
                "received_at": received_at,
                "payload": dict(sample.payload),
            }
            for _, sample in sorted(unique.items())
        ]
        statement = (
            self._insert(telemetry)
            .on_conflict_do_nothing(index_elements=[telemetry.c.node, telemetry.c.seq])
            .returning(telemetry.c.node, telemetry.c.seq)
        )
        # RETURNING lists only the rows inserted, on SQLite (>= 3.35) and PostgreSQL alike; rowcount of
        # an executemany is not reliable across drivers.
        return {(row.node, row.seq) for row in conn.execute(statement, rows).all()}

    def _update_latest(self, conn: Connection, samples: Sequence[TelemetrySample], received_at: float) -> None:
        """Keep each node's latest telemetry, and the worst gate readings since its last change."""
        rows: dict[str, dict[str, Any]] = {}
        for sample in samples:
            if sample.kind != TELEMETRY:
                continue
            agent = sample.payload.get("agent") or {}
            row = rows.setdefault(sample.node, {
                "id": sample.node, **self._node_defaults(), "telemetry_seq": sample.seq, "telemetry_at": received_at,
            })  # fmt: skip
            row["telemetry_seq"] = max(row["telemetry_seq"], sample.seq)
            row["worst_error_rate"] = _worse(row["worst_error_rate"], agent.get("error_rate"))
            row["worst_p95_ms"] = _worse(row["worst_p95_ms"], agent.get("latency_p95_ms"))
        if not rows:
            return
        statement = self._insert(nodes)
        new = statement.excluded
        newer = or_(nodes.c.telemetry_seq.is_(None), nodes.c.telemetry_seq < new.telemetry_seq)
        set_ = {
            "telemetry_seq": case((newer, new.telemetry_seq), else_=nodes.c.telemetry_seq),
            "telemetry_at": case((newer, new.telemetry_at), else_=nodes.c.telemetry_at),
            "worst_error_rate": _worse_sql(nodes.c.worst_error_rate, new.worst_error_rate),
            "worst_p95_ms": _worse_sql(nodes.c.worst_p95_ms, new.worst_p95_ms),
        }
        ordered = [rows[node] for node in sorted(rows)]
        conn.execute(statement.on_conflict_do_update(index_elements=[nodes.c.id], set_=set_), ordered)

    def record_gap(self, node: str, first_seq: int, last_seq: int) -> None:
        """The node dropped ``first_seq..last_seq`` (inclusive) on outbox overflow: they will never come."""
        with self.engine.begin() as conn:
            self._record_gap(conn, Gap(node, first_seq, last_seq))

    def _record_gap(self, conn: Connection, gap: Gap) -> None:
        if gap.first > gap.last:
            raise ValueError(f"gap {gap.first}..{gap.last} of {gap.node} is empty")
        statement = self._insert(telemetry_gaps).values(node=gap.node, first_seq=gap.first, last_seq=gap.last)
        wider = case(
            (telemetry_gaps.c.last_seq < statement.excluded.last_seq, statement.excluded.last_seq),
            else_=telemetry_gaps.c.last_seq,
        )
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[telemetry_gaps.c.node, telemetry_gaps.c.first_seq], set_={"last_seq": wider}
            )
        )

    def advance_ack(self, node: str) -> int:
        """Move the node's ack watermark over every contiguous seq now stored or known lost; returns it."""
        with self.engine.begin() as conn:
            return self._advance_ack(conn, node)[1]

    def _advance_ack(self, conn: Connection, node: str) -> tuple[int, int]:
        """``(before, after)``: the watermark as stored, and as moved over what is stored now."""
        before = conn.execute(select(acks.c.seq).where(acks.c.node == node)).scalar_one_or_none() or 0
        current = before
        while True:
            gap_end = conn.execute(
                select(func.max(telemetry_gaps.c.last_seq)).where(
                    telemetry_gaps.c.node == node,
                    telemetry_gaps.c.first_seq <= current + 1,
                    telemetry_gaps.c.last_seq > current,
                )
            ).scalar_one_or_none()
            if gap_end is not None:
                current = gap_end
                continue
            seqs = (
                conn.execute(
                    select(telemetry.c.seq)
                    .where(telemetry.c.node == node, telemetry.c.seq > current)
                    .order_by(telemetry.c.seq)
                    .limit(ACK_SCAN_CHUNK)
                )
                .scalars()
                .all()
            )
            contiguous = 0
            while contiguous < len(seqs) and seqs[contiguous] == current + 1:
                current += 1
                contiguous += 1
            if contiguous == 0:  # a gap nobody declared, or the end of what is stored
                break
        if current == before:
            return before, before
        statement = self._insert(acks).values(node=node, seq=current)
        # Never backwards, even if another replica moved it further meanwhile.
        higher = case((acks.c.seq < statement.excluded.seq, statement.excluded.seq), else_=acks.c.seq)
        conn.execute(statement.on_conflict_do_update(index_elements=[acks.c.node], set_={"seq": higher}))
        return before, int(conn.execute(select(acks.c.seq).where(acks.c.node == node)).scalar_one())

    def ack_watermark(self, node: str) -> int:
        """The node's ack watermark as stored (0: nothing acknowledged)."""
        with self.engine.begin() as conn:
            return conn.execute(select(acks.c.seq).where(acks.c.node == node)).scalar_one_or_none() or 0

    def latest_telemetry(self, node: str) -> TelemetryRecord | None:
        """The node's telemetry sample of the highest seq (events aside): what the rollout gates judge."""
        query = (
            select(telemetry)
            .where(telemetry.c.node == node, telemetry.c.kind == TELEMETRY)
            .order_by(telemetry.c.seq.desc())
            .limit(1)
        )
        with self.engine.begin() as conn:
            row = conn.execute(query).one_or_none()
        if row is None:
            return None
        return TelemetryRecord(row.node, row.seq, row.kind, row.received_at, row.payload)

    def telemetry_count(self, node: str | None = None, kind: str | None = None) -> int:
        """Messages stored, for a node and of a kind when given."""
        query = select(func.count()).select_from(telemetry)
        if node is not None:
            query = query.where(telemetry.c.node == node)
        if kind is not None:
            query = query.where(telemetry.c.kind == kind)
        with self.engine.begin() as conn:
            return int(conn.execute(query).scalar_one())

    # Leases.

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``ttl_s`` seconds; True if ``holder`` has it now. One statement
        (an upsert that only replaces a lapsed lease or the holder's own), so two replicas asking at once
        cannot both win, on SQLite and PostgreSQL alike."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, not {ttl_s}")
        now = self._clock()
        statement = self._insert(leases).values(name=name, holder=holder, expires_at=now + ttl_s)
        new = statement.excluded
        mine_or_lapsed = or_(leases.c.holder == new.holder, leases.c.expires_at < now)
        with self.engine.begin() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[leases.c.name], set_={"holder": new.holder, "expires_at": new.expires_at},
                    where=mine_or_lapsed,
                )
            )  # fmt: skip
            current = conn.execute(select(leases.c.holder).where(leases.c.name == name)).scalar_one()
        return bool(current == holder)

    def release_lease(self, name: str, holder: str) -> None:
        """Give lease ``name`` up at once if ``holder`` has it (a clean stop: the next replica need not wait)."""
        with self.engine.begin() as conn:
            conn.execute(leases.delete().where(leases.c.name == name, leases.c.holder == holder))

    def lease_holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now (None: nobody, or it lapsed)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(leases.c.holder, leases.c.expires_at).where(leases.c.name == name)).first()
        return row.holder if row is not None and row.expires_at >= self._clock() else None

    # Drop counters.

    def count_drop(self, source: str, reason: str, count: int = 1) -> None:
        """Add to the count of messages ``source`` dropped for ``reason``."""
        statement = self._insert(drops).values(source=source, reason=reason, dropped=count)
        total = drops.c.dropped + statement.excluded.dropped
        with self.engine.begin() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[drops.c.source, drops.c.reason], set_={"dropped": total}
                )
            )

    def drop_counts(self) -> dict[tuple[str, str], int]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(drops)).all()
        return {(row.source, row.reason): row.dropped for row in rows}


def _worse(current: float | None, new: float | None) -> float | None:
    """The higher of two gate readings; a missing one (no agent metrics) is no reading."""
    if new is None:
        return current
    return new if current is None or new > current else current


def _worse_sql(current: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
    """``_worse`` in SQL (SQLite has no GREATEST, and NULL must not win)."""
    return case((new.is_(None), current), (or_(current.is_(None), current < new), new), else_=current)


def _walk(watermark: int, seqs: Sequence[int], gaps: Sequence[tuple[int, int]]) -> int:
    """The watermark moved over the sorted stored ``seqs`` above it and the declared ``gaps``."""
    current, index = watermark, 0
    while True:
        gap_end = max((last for first, last in gaps if first <= current + 1 < last + 1), default=None)
        if gap_end is not None and gap_end > current:
            current = gap_end
            while index < len(seqs) and seqs[index] <= current:
                index += 1
            continue
        if index < len(seqs) and seqs[index] == current + 1:
            current += 1
            index += 1
            continue
        return current


def _node_record(row: Row[Any]) -> NodeRecord:
    return NodeRecord(
        id=row.id,
        labels=dict(row.labels),
        facts=_facts_from_json(row.facts),
        artifact=row.artifact,
        reported_generation=row.reported_generation,
        desired_generation=row.desired_generation,
        desired_artifact=row.desired_artifact,
        ready=row.ready,
        health=row.health,
        failed_generation=row.failed_generation,
        error=row.error,
        online=row.online,
        bd_seq=row.bd_seq,
        last_seen=row.last_seen,
        telemetry=(
            Telemetry(at=row.telemetry_at, error_rate=row.worst_error_rate, p95_ms=row.worst_p95_ms)
            if row.telemetry_at is not None
            else None
        ),
    )
