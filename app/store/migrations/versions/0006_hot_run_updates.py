"""hot run updates: no per-iteration column in an index of runs; room on its pages

Every iteration writes the run's row twice (the claim, the outcome). PostgreSQL
can write a new row version in place (a HOT update: no new index entries, and
the old version is pruned on the page itself, without VACUUM) only when no
indexed column changes and the page has room for the new version.

- ix_runs_status_next_run_at -> ix_runs_status_created_at: next_run_at changes
  on nearly every write, so that index made nearly every update a non-HOT one
  (a new entry in every index of runs, and a row version VACUUM alone reclaims:
  the table grew by ~1.5 KB an iteration with autovacuum off). The sweep finds
  overdue runs among the active ones by status alone; run lists filter by
  status, newest first.
- fillfactor 50 on runs (PostgreSQL): a page is filled half by new rows, the
  rest left for their updated versions. Applies to pages written from now on.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

RUNS_FILLFACTOR = 50


def upgrade() -> None:
    op.drop_index("ix_runs_status_next_run_at", table_name="runs")
    op.create_index("ix_runs_status_created_at", "runs", ["status", "created_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE runs SET (fillfactor = {RUNS_FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE runs RESET (fillfactor)")
    op.drop_index("ix_runs_status_created_at", table_name="runs")
    op.create_index("ix_runs_status_next_run_at", "runs", ["status", "next_run_at"])
