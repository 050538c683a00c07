"""run outcomes: runs.ended_by, runs.end_reason (the status `rejected` needs no DDL)

A run a person's decision ended — a step rejected with no other way to do the
task (status `rejected`), or a cancel — keeps who decided and why, in their
words; `error` is left for errors. Runs cancelled before this revision said so
in `error` ("cancelled by NAME", or "imported while …"): moved here once.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PREFIX = "cancelled by "


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("ended_by", sa.String(length=120), nullable=True))
        batch.add_column(sa.Column("end_reason", sa.Text(), nullable=True))
    op.execute(
        sa.text(
            "UPDATE runs SET ended_by = substr(error, :start), error = NULL "
            "WHERE status = 'cancelled' AND error LIKE :pattern"
        ).bindparams(start=len(PREFIX) + 1, pattern=PREFIX + "%")
    )
    op.execute(
        "UPDATE runs SET end_reason = error, error = NULL "
        "WHERE status = 'cancelled' AND error LIKE 'imported while %'"
    )


def downgrade() -> None:
    op.execute(
        "UPDATE runs SET error = 'cancelled by ' || ended_by "
        "WHERE status = 'cancelled' AND error IS NULL AND ended_by IS NOT NULL"
    )
    op.execute(
        "UPDATE runs SET status = 'failed', error = 'rejected by ' || "
        "coalesce(ended_by, 'a person') || ': ' || coalesce(end_reason, '') "
        "WHERE status = 'rejected'"
    )
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("end_reason")
        batch.drop_column("ended_by")
