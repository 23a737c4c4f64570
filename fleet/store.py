"""The controller's state in SQL, through SQLAlchemy Core: SQLite by default, PostgreSQL at scale.

Nothing here is SQLite-only: conflicts are resolved with ``INSERT ... ON CONFLICT`` built by the
dialect's own ``insert`` (SQLite and PostgreSQL spell it the same), comparisons use ``CASE`` rather than
``max()``/``greatest()``, and times are epoch seconds from the injected clock, not database functions.

The tables, opening a database and migrating it are ``fleet.schema``'s; ``Store.open`` does both.

Batches of rows are written in key order (nodes by id, samples by node and seq): two controller replicas
writing overlapping batches to PostgreSQL then lock the rows they share in the same order, rather than
one being aborted as a deadlock (SQLite locks the whole file per transaction and never deadlocks).

Every method is blocking; an asyncio controller calls them from an executor, never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Table,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError

from fleet import schema
from fleet.rollout import NodeObservation, ReleaseVariant, RolloutState, RolloutStatus, Telemetry
from fleet.schema import (
    NAME_LENGTH,
    StoreError,
    acks,
    drops,
    leases,
    nodes,
    release_variants,
    releases,
    rollouts,
    telemetry,
    telemetry_gaps,
)
from quantize.distill.spec import spec_of_student
from quantize.manifest import Manifest, artifact_id
from quantize.specs import Z_IMAGE_TURBO
from quantize.variants import VariantRecipe
from zimage_edge.device import DeviceFacts

# Rows read per query while walking the ack watermark over a node's backlog: a node back from an
# outage of hours at one message per second brings thousands; chunks keep the walk's memory flat.
ACK_SCAN_CHUNK = 1000
# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back whole and may
# simply run again. A few tries: a victim waits out the other transaction, which then has its locks.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
# Births, deaths and reports written per transaction: ~1.3 ms of CPU each, so a transaction holds
# SQLite's one write lock for well under a second even on a busy machine, and the lease and the rollout
# steps get their turn (5,000 nodes registering at once held it past the 5 s busy timeout in one go).
CHANGES_PER_TRANSACTION = 250
DEADLOCK_RETRIES = 3

_T = TypeVar("_T")

# The dialects whose ``insert`` has ``on_conflict_do_nothing``/``_do_update``.
_INSERTS: dict[str, Callable[[Table], Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


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
        """What ``fleet.rollout.choose_variant`` needs: the recipe the artifact was made with, its size, and
        for a distilled student the parameter counts it stands for (the planner sizes it by those)."""
        recipe = VariantRecipe.from_dict(self.manifest.variant.model_dump(mode="json"))
        distilled = self.manifest.distillation
        model = spec_of_student(Z_IMAGE_TURBO, distilled.components) if distilled is not None else None
        return ReleaseVariant(recipe, self.artifact_id, self.bytes, model)


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
class StateChange:
    """A node's birth (``online``) or death (its will or clean stop) with its connection's bd_seq."""

    node: str
    bd_seq: int
    online: bool


@dataclass(frozen=True)
class Report:
    """What a node says it runs (its retained ``reported``)."""

    node: str
    generation: int
    artifact: str | None
    ready: bool
    health: str | None = None
    error: str | None = None
    facts: DeviceFacts | None = None
    labels: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Ingested:
    """What one ``Store.ingest`` did."""

    new: int  # samples stored
    duplicates: int  # samples already stored (redelivered), not stored again
    acks: dict[str, int]  # node -> its ack watermark, for the nodes whose watermark moved
    late_wills: int = 0  # deaths of an earlier connection of a node that has been born again: not applied


@dataclass(frozen=True)
class TelemetryRecord:
    node: str
    seq: int
    kind: str
    received_at: float
    payload: dict[str, Any]


# URL schemes that name PostgreSQL without a driver: SQLAlchemy would pick psycopg2, which is not
# installed; psycopg 3 is (pyproject.toml). ``postgres://`` is what Heroku-style settings give.
def _model_of(manifest: Manifest) -> str:
    """The content hash of the model an artifact is a variant of (a student's: its teacher's)."""
    return manifest.distillation.teacher_sha256 if manifest.distillation is not None else manifest.source.sha256


def _checked_name(what: str, name: str) -> str:
    """Names are primary keys of ``NAME_LENGTH`` characters: PostgreSQL refuses a longer one mid-write, and
    SQLite would keep it; refuse it up front on both, as a ``StoreError`` the API reports as a bad request."""
    if not 0 < len(name) <= NAME_LENGTH:
        raise StoreError(f"a {what} name has 1-{NAME_LENGTH} characters, not {len(name)}")
    return name


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
        schema.prepare(engine)

    @classmethod
    def open(cls, database: str | Path, clock: Callable[[], float] = time.time) -> Store:
        """Open (and create, if new) the store at a file path or a database URL."""
        engine = schema.open_engine(database)
        try:
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

    @property
    def schema_version(self) -> int:
        """The schema version the ``meta`` table records."""
        return schema.schema_version(self.engine)

    @property
    def revision(self) -> str | None:
        """The Alembic revision the database is at (``None``: not migrated by Alembic)."""
        return schema.revision(self.engine)

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
            self._record_birth(conn, node, bd_seq)

    def _record_birth(self, conn: Connection, node: str, bd_seq: int) -> None:
        self._upsert_node(conn, node, {"online": True, "bd_seq": bd_seq, "last_seen": self._clock()})

    def record_death(self, node: str, bd_seq: int) -> bool:
        """The node's will (or clean stop): offline, unless ``bd_seq`` is not its current connection's.

        Returns whether it applied: a late will of an earlier connection must not mark a reborn node
        offline; with no birth seen (a retained death on a fresh subscription) the death applies. The
        rule of ``fleet.protocol.state_decision``, checked inside the statements themselves so that it
        holds with several controller replicas writing at once.
        """
        with self.engine.begin() as conn:
            return self._record_death(conn, node, bd_seq)

    def _record_death(self, conn: Connection, node: str, bd_seq: int) -> bool:
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
        report = Report(node, generation, artifact, ready, health, error, facts, labels)
        with self.engine.begin() as conn:
            self._record_reported(conn, report)

    def _record_reported(self, conn: Connection, report: Report) -> None:
        values: dict[str, Any] = {
            "reported_generation": report.generation, "artifact": report.artifact, "ready": report.ready,
            "health": report.health, "error": report.error,
        }  # fmt: skip
        if report.facts is not None:
            values["facts"] = report.facts.to_dict()
        if report.labels is not None:
            values["labels"] = dict(report.labels)
        statement = self._insert(nodes).values(id=report.node, **{**self._node_defaults(), **values})
        new = statement.excluded
        # A new generation applied or another artifact running starts the gate readings afresh.
        changed = or_(
            nodes.c.reported_generation != new.reported_generation, nodes.c.artifact.is_distinct_from(new.artifact)
        )
        set_: dict[str, Any] = {**{key: new[key] for key in values}}
        set_["worst_error_rate"] = case((changed, None), else_=nodes.c.worst_error_rate)
        set_["worst_p95_ms"] = case((changed, None), else_=nodes.c.worst_p95_ms)
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
        # One model per release: a distilled student counts as its teacher's (``int4`` and ``student-int8``
        # of one model side by side), compared by the content hash both records keep.
        sources = {_model_of(manifest) for manifest in manifests}
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
        self,
        samples: Sequence[TelemetrySample],
        gaps: Sequence[Gap] = (),
        failures: Sequence[Failure] = (),
        *,
        changes: Sequence[StateChange | Report] = (),
    ) -> Ingested:
        """One batch of what nodes said. First the births, deaths and reports in ``changes`` (each node's
        in the order they came), ``CHANGES_PER_TRANSACTION`` to a transaction: a fleet reconnecting at once
        (a broker restart) sends a birth and a report per node, and a commit each would cost more than the
        rows themselves. Then,
        in a second, what their outboxes sent: the samples (each ``(node, seq)`` once), declared gaps,
        refusals, each node's latest telemetry, and the ack watermarks moved over what is now stored.
        Returns the watermarks that moved (to publish) and the late wills refused.

        Each transaction locks node rows in one pass in the order of their ids, so replicas ingesting at
        once wait for each other rather than deadlock; PostgreSQL may still pick one as a deadlock victim
        (index locks of new rows), and that transaction is run again (``DEADLOCK_RETRIES``)."""
        for gap in gaps:  # checked before anything is written: a bad batch changes nothing
            if gap.first > gap.last:
                raise ValueError(f"gap {gap.first}..{gap.last} of {gap.node} is empty")
        late_wills = 0
        ordered = sorted(changes, key=lambda change: change.node)  # stable: a node's own order is kept
        for start in range(0, len(ordered), CHANGES_PER_TRANSACTION):
            chunk = ordered[start : start + CHANGES_PER_TRANSACTION]
            late_wills += self._retrying(partial(self._apply_changes, changes=chunk))
        if not (samples or gaps or failures):
            return Ingested(new=0, duplicates=0, acks={}, late_wills=late_wills)

        def outbox(conn: Connection) -> Ingested:
            received_at = self._clock()
            inserted = self._insert_samples(conn, samples, received_at)
            for gap in gaps:
                self._record_gap(conn, gap)
            for failure in failures:
                self._record_failure(conn, failure)
            self._update_latest(conn, [s for s in samples if (s.node, s.seq) in inserted], received_at)
            moved = self._advance_acks(conn, {s.node for s in samples} | {g.node for g in gaps})
            return Ingested(new=len(inserted), duplicates=len(samples) - len(inserted), acks=moved,
                            late_wills=late_wills)  # fmt: skip

        return self._retrying(outbox)

    def _apply_changes(self, conn: Connection, *, changes: Sequence[StateChange | Report]) -> int:
        """Births, deaths and reports; returns how many deaths were late wills (not applied)."""
        late_wills = 0
        for change in changes:
            if isinstance(change, Report):
                self._record_reported(conn, change)
            elif change.online:
                self._record_birth(conn, change.node, change.bd_seq)
            elif not self._record_death(conn, change.node, change.bd_seq):
                late_wills += 1
        return late_wills

    def _retrying(self, work: Callable[[Connection], _T]) -> _T:
        """``work`` in a transaction, run again when the database picked it as a deadlock victim or
        failed it for serialization (it rolled back whole: running it again is safe)."""
        for _ in range(DEADLOCK_RETRIES):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) not in RETRYABLE_SQLSTATES:
                    raise
        with self.engine.begin() as conn:  # the last try: whatever it raises is the caller's
            return work(conn)

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
