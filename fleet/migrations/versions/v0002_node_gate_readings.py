"""Schema version 2: the rollout gates' readings on the node row (latest telemetry, worst since a change).

Revision ID: 0002
Revises: 0001

Adds ``nodes.telemetry_seq``, ``telemetry_at``, ``worst_error_rate`` and ``worst_p95_ms`` and fills them
from what version 1 kept: each node's telemetry sample of the highest seq (events aside), its receipt
time, and its agent's error rate and p95. Version 1's gates judged exactly that latest sample, and it
recorded nothing of when a node last changed, so "the worst since the change" starts from it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
# The schema version this revision makes (kept in the ``meta`` table; see fleet.schema).
schema_version = 2

JSONValue = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
COLUMNS = ("telemetry_seq", "telemetry_at", "worst_error_rate", "worst_p95_ms")
TELEMETRY = "telemetry"  # the kind of a telemetry sample; an event's is "events"

# The tables as this revision reads and writes them (never fleet.schema's: those move on).
meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.String))
nodes = sa.table(
    "nodes",
    sa.column("id", sa.String),
    sa.column("telemetry_seq", sa.BigInteger),
    sa.column("telemetry_at", sa.Float),
    sa.column("worst_error_rate", sa.Float),
    sa.column("worst_p95_ms", sa.Float),
)
telemetry = sa.table(
    "telemetry",
    sa.column("node", sa.String),
    sa.column("seq", sa.BigInteger),
    sa.column("kind", sa.String),
    sa.column("received_at", sa.Float),
    sa.column("payload", JSONValue),
)


def upgrade() -> None:
    op.add_column("nodes", sa.Column("telemetry_seq", sa.BigInteger, nullable=True))
    op.add_column("nodes", sa.Column("telemetry_at", sa.Float, nullable=True))
    op.add_column("nodes", sa.Column("worst_error_rate", sa.Float, nullable=True))
    op.add_column("nodes", sa.Column("worst_p95_ms", sa.Float, nullable=True))
    if not context.is_offline_mode():
        # An SQL script (``alembic upgrade --sql``) cannot read the telemetry first: there the columns
        # start empty, and each node's next telemetry sample fills them.
        _backfill(op.get_bind())
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(schema_version)))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:  # SQLite rebuilds the table; PostgreSQL drops in place
        for column in COLUMNS:
            batch.drop_column(column)
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(schema_version - 1)))


def _backfill(conn: sa.Connection) -> None:
    """Each known node's latest telemetry sample, as version 1's gates read it."""
    latest = (
        sa.select(telemetry.c.node, sa.func.max(telemetry.c.seq).label("seq"))
        .where(telemetry.c.kind == TELEMETRY)
        .group_by(telemetry.c.node)
        .subquery()
    )
    query = (
        sa.select(telemetry.c.node, telemetry.c.seq, telemetry.c.received_at, telemetry.c.payload)
        .join(latest, sa.and_(telemetry.c.node == latest.c.node, telemetry.c.seq == latest.c.seq))
        .where(telemetry.c.node.in_(sa.select(nodes.c.id)))
    )
    rows = [
        {
            "node_id": row.node,
            "telemetry_seq": row.seq,
            "telemetry_at": row.received_at,
            "worst_error_rate": _reading(row.payload, "error_rate"),
            "worst_p95_ms": _reading(row.payload, "latency_p95_ms"),
        }
        for row in conn.execute(query)
    ]
    if rows:
        conn.execute(
            nodes.update()
            .where(nodes.c.id == sa.bindparam("node_id"))
            .values({column: sa.bindparam(column) for column in COLUMNS}),
            rows,
        )


def _reading(payload: Any, key: str) -> float | None:
    """A gate reading of the sample's agent section; None when the agent reported no metrics."""
    agent = payload.get("agent") if isinstance(payload, dict) else None
    value = agent.get(key) if isinstance(agent, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
