"""The controller store's database: its schema (the tables), opening an engine, and migrating it.

The schema is migrated with Alembic (``fleet/migrations``, shipped in the package, run by ``prepare``
without an ``alembic.ini``); see ``prepare`` for what it does with the database it is given. The
``meta`` table keeps the schema version beside Alembic's ``alembic_version``: every revision sets it, so
a release that predates Alembic (which reads only ``meta``) still refuses a database newer than itself.
``fleet.store`` reads and writes the rows.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping
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
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import OperationalError

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


class StoreError(ZimageEdgeError):
    """The database cannot be used as the controller's store, or a write contradicts what it holds."""


class SchemaVersionError(StoreError):
    """The database was written with another schema version."""


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


def open_engine(database: str | Path) -> Engine:
    """An engine on a file path (SQLite, in WAL mode) or a database URL; ``prepare`` migrates it."""
    engine = create_engine(database_url(database), json_serializer=_json_dumps)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        try:
            _use_wal(engine)
        except BaseException:
            engine.dispose()  # a refused database: close the pool's connections, not leave them to GC
            raise
    return engine


def prepare(engine: Engine) -> None:
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
    with _MIGRATING, engine.begin() as conn:
        _lock_for_migration(engine, conn)
        config = alembic_config(conn)
        script = ScriptDirectory.from_config(config)
        existing = set(inspect(conn).get_table_names())
        if existing:
            _adopt(engine, conn, config, script, existing)
        command.upgrade(config, "head")


def _lock_for_migration(engine: Engine, conn: Connection) -> None:
    """Serialise ``prepare`` across processes; held until the transaction ends."""
    where = engine.url.render_as_string()
    try:
        if engine.dialect.name == "postgresql":
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


def _adopt(engine: Engine, conn: Connection, config: Config, script: ScriptDirectory, existing: set[str]) -> None:
    """Check a database that holds tables, and stamp one written before Alembic at its revision."""
    where = engine.url.render_as_string()
    if "meta" not in existing:
        raise StoreError(
            f"{where} holds tables ({', '.join(sorted(existing))}) "
            "but no zimage-edge schema version: not a fleet store; give another database"
        )
    found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one_or_none()
    if found is None:
        raise StoreError(f"{where} has a meta table without a schema version: not a fleet store")
    version = int(found)
    _check_version(engine, version)
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


def _check_version(engine: Engine, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{engine.url.render_as_string()} has schema version {version}, newer than this "
            f"zimage-edge's {SCHEMA_VERSION}: it was written by a newer release; upgrade zimage-edge to use it"
        )


def schema_version(engine: Engine) -> int:
    """The schema version the ``meta`` table records."""
    with engine.begin() as conn:
        return int(conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one())


def revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (``None``: not migrated by Alembic)."""
    with engine.begin() as conn:
        return MigrationContext.configure(conn).get_current_revision()
