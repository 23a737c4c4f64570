"""Schema version 3: leases, so that one controller replica at a time drives rollouts.

Revision ID: 0003
Revises: 0002

Adds the ``leases`` table: a named lease, who holds it, and until when (the holder's clock). Nothing to
fill: the first replica to tick after the upgrade takes the lease.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
# The schema version this revision makes (kept in the ``meta`` table; see fleet.schema).
schema_version = 3

NAME_LENGTH = 128  # fleet.schema.NAME_LENGTH when this revision was written

meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.String))


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(schema_version)))


def downgrade() -> None:
    op.drop_table("leases")
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(schema_version - 1)))
