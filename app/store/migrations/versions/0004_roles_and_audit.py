"""roles and audit: users.role, users.disabled_at, users.session_version; audit_log

- role: viewer | operator | approver | admin. Users that existed before roles
  could create and decide, so they become approvers.
- disabled_at: a disabled user's sessions and tokens stop working at once.
- session_version: part of every session cookie; bumping it (sign-out, password
  change, disable) ends every session signed in before.
- audit_log: who changed whom (roles, passwords, tokens, accounts), with the actor.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("role", sa.String(length=16), nullable=False, server_default="approver")
        )
        batch.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("session_version", sa.Integer(), nullable=False, server_default="1")
        )
    with op.batch_alter_table("users") as batch:
        batch.alter_column("role", server_default="operator")
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("actor", sa.String(length=120), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=120), nullable=False),
        sa.Column("detail", Json, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_subject", "audit_log", ["subject", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_subject", table_name="audit_log")
    op.drop_table("audit_log")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("session_version")
        batch.drop_column("disabled_at")
        batch.drop_column("role")
