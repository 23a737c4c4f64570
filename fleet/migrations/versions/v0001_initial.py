"""Schema version 1: the store as the first release wrote it (nodes, releases, rollouts, telemetry, acks).

Revision ID: 0001
Revises:

The tables exactly as ``fleet/store.py`` declared them at schema version 1, so that a database that
release made (``meta`` says 1, no ``alembic_version``) is stamped here and upgraded from here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
# The schema version this revision makes (kept in the ``meta`` table; see fleet.schema).
schema_version = 1

NAME_LENGTH = 128
ARTIFACT_ID_LENGTH = 64
JSONValue = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("labels", JSONValue, nullable=False),
        sa.Column("facts", JSONValue, nullable=True),
        sa.Column("artifact", sa.String(ARTIFACT_ID_LENGTH), nullable=True),
        sa.Column("reported_generation", sa.BigInteger, nullable=False),
        sa.Column("desired_generation", sa.BigInteger, nullable=False),
        sa.Column("desired_artifact", sa.String(ARTIFACT_ID_LENGTH), nullable=True),
        sa.Column("ready", sa.Boolean, nullable=False),
        sa.Column("health", sa.Text, nullable=True),
        sa.Column("failed_generation", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("bd_seq", sa.BigInteger, nullable=True),
        sa.Column("last_seen", sa.Float, nullable=True),
    )
    op.create_table(
        "releases",
        sa.Column("name", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "release_variants",
        sa.Column("release", sa.String(NAME_LENGTH), sa.ForeignKey("releases.name"), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("artifact_id", sa.String(ARTIFACT_ID_LENGTH), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("url", sa.Text, nullable=True),
        sa.Column("manifest", JSONValue, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("release", sa.String(NAME_LENGTH), sa.ForeignKey("releases.name"), nullable=False),
        sa.Column("spec", JSONValue, nullable=False),
        sa.Column("state", JSONValue, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("rollouts_status", "rollouts", ["status"])
    op.create_table(
        "telemetry",
        sa.Column("node", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("payload", JSONValue, nullable=False),
    )
    op.create_table(
        "telemetry_gaps",
        sa.Column("node", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("first_seq", sa.BigInteger, primary_key=True),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "acks",
        sa.Column("node", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "drops",
        sa.Column("source", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("reason", sa.String(64), primary_key=True),
        sa.Column("dropped", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(meta, [{"key": "schema_version", "value": str(schema_version)}])


def downgrade() -> None:
    # Referencing tables before the ones they reference.
    for table in ("drops", "acks", "telemetry_gaps", "telemetry", "rollouts", "release_variants", "releases", "nodes"):
        op.drop_table(table)
    op.drop_table("meta")
