"""nudges and idempotency keys: runs.nudged_at, runs.idempotency_key, runs.request_hash

- nudged_at: when the sweep last published a nudge for the run; a claim clears it,
  so a run has at most one nudge outstanding and the queue stays bounded by live runs.
- idempotency_key / request_hash: a client that retries a create with the same key
  gets the run it created the first time, not a second one.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("nudged_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(length=300), nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch.create_index("ux_runs_idempotency_key", ["idempotency_key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ux_runs_idempotency_key")
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
        batch.drop_column("nudged_at")
