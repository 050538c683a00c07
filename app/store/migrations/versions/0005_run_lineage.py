"""run lineage: runs.parent_run_id, runs.forked_from_step; steps.context_updates

A fork (`agentloop fork RUN --from-step N`) is a new run whose history is its
parent's up to step N. These say where it came from:

- parent_run_id: the run it was forked from. No foreign key: pruning or
  deleting the parent must not delete or rewrite its forks, and an exported
  fork imports into a database that never held its parent.
- forked_from_step: N, the step number as the run page and `agentloop status`
  show it (1-based, in the order the steps ran).
- steps.context_updates: what a completed step set in the run context (set_env's
  name and value). The run's context is the merge of these in step order, so a
  fork rebuilds the context exactly as it was after step N. NULL: set nothing.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("parent_run_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("forked_from_step", sa.Integer(), nullable=True))
        batch.create_index("ix_runs_parent_run_id", ["parent_run_id"])
    with op.batch_alter_table("steps") as batch:
        batch.add_column(sa.Column("context_updates", Json, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        batch.drop_column("context_updates")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_parent_run_id")
        batch.drop_column("forked_from_step")
        batch.drop_column("parent_run_id")
