"""People: users who sign in to the web app, and the bearer tokens of the JSON API.

Passwords are kept as werkzeug hashes (scrypt); API tokens as SHA-256 digests,
so neither table grants anything if it leaks. Every user has a role; a disabled
user's sessions and tokens stop working at once, and so does every session
signed in before a sign-out or a password change (the session version). Who
changed whom is kept in the audit log.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from secrets import token_urlsafe
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from app.store.schema import api_tokens, audit_log, users

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,79}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
TOKEN_PREFIX = "al_"
# Checked against when the name is unknown, so a wrong name takes as long as a
# wrong password and sign-in does not reveal which names exist.
_DUMMY_HASH = generate_password_hash("not-a-real-password")


class AccountError(ValueError):
    """A user cannot be created or changed as asked; the message says why."""


class Role(StrEnum):
    """What a user may do, each role including the ones before it."""

    VIEWER = "viewer"  # read runs
    OPERATOR = "operator"  # create runs, cancel their own
    APPROVER = "approver"  # decide on runs that name them, or by the deployment's policy
    ADMIN = "admin"  # everything, and user management

    def includes(self, other: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(other)


@dataclass(frozen=True)
class User:
    id: int
    name: str
    email: str | None
    role: Role = Role.OPERATOR
    disabled: bool = False
    session_version: int = 1

    def answers_to(self, names: tuple[str, ...]) -> bool:
        """True when `names` (approvers: names or emails) include this user."""
        wanted = {n.casefold() for n in names}
        return self.name.casefold() in wanted or bool(
            self.email and self.email.casefold() in wanted
        )

    def can(self, role: Role) -> bool:
        """Whether this user's role includes `role` (and the user is not disabled)."""
        return not self.disabled and self.role.includes(role)


@dataclass(frozen=True)
class Token:
    id: int
    label: str
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]
    created_at: datetime


def _user(row: Row[Any]) -> User:
    return User(
        id=int(row.id),
        name=str(row.name),
        email=row.email,
        role=Role(row.role),
        disabled=row.disabled_at is not None,
        session_version=int(row.session_version),
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"the password is longer than {MAX_PASSWORD} characters")


class Accounts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- users ----------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        password: str,
        *,
        email: str | None = None,
        role: Role = Role.OPERATOR,
        by: str = "agentloop",
    ) -> User:
        """Create a user. Raises AccountError (bad name, short password, name taken)."""
        if not NAME_PATTERN.match(name):
            raise AccountError(
                "a user name is 1-80 letters, digits, '.', '_', '@' or '-', starting with a "
                "letter or digit"
            )
        check_password(password)
        if email is not None and "@" not in email:
            raise AccountError(f"{email!r} is not an email address")
        try:
            with self.engine.begin() as conn:
                user_id = conn.execute(
                    insert(users)
                    .values(
                        name=name,
                        email=email,
                        password_hash=generate_password_hash(password),
                        role=role,
                        session_version=1,
                        created_at=_now(),
                    )
                    .returning(users.c.id)
                ).scalar_one()
                _audit(conn, by, "user.add", name, {"role": role, "email": email})
        except IntegrityError:
            raise AccountError(f"a user named {name!r} already exists") from None
        return User(id=int(user_id), name=name, email=email, role=role)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs and they are enabled; None otherwise (same
        time either way)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        stored = row.password_hash if row is not None else _DUMMY_HASH
        if not check_password_hash(stored, password[:MAX_PASSWORD]) or row is None:
            return None
        user = _user(row)
        return None if user.disabled else user

    def get(self, user_id: int) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.id == user_id)).first()
        return _user(row) if row is not None else None

    def signed_in(self, user_id: int, session_version: int) -> User | None:
        """The user a session cookie names, if it still may: the user is enabled and
        has not signed out (or changed password) since the cookie was made."""
        user = self.get(user_id)
        if user is None or user.disabled or user.session_version != session_version:
            return None
        return user

    def by_name(self, name: str) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        return _user(row) if row is not None else None

    def list_users(self) -> list[User]:
        with self.engine.connect() as conn:
            return [_user(r) for r in conn.execute(select(users).order_by(users.c.name))]

    def unknown_names(self, names: tuple[str, ...]) -> list[str]:
        """Those of `names` (user names, not emails) that name no user."""
        wanted = [n for n in names if "@" not in n]
        if not wanted:
            return []
        with self.engine.connect() as conn:
            known = set(
                conn.execute(select(users.c.name).where(users.c.name.in_(wanted))).scalars()
            )
        return [n for n in wanted if n not in known]

    def emails_for(self, names: tuple[str, ...]) -> dict[str, str]:
        """The email address of each named user that has one."""
        if not names:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(users.c.name, users.c.email).where(
                    users.c.name.in_(names), users.c.email.is_not(None)
                )
            )
            return {str(r.name): str(r.email) for r in rows}

    def set_role(self, name: str, role: Role, *, by: str) -> User:
        return self._change(name, {"role": role}, by=by, action="user.role", detail={"role": role})

    def set_disabled(self, name: str, disabled: bool, *, by: str) -> User:
        """Disable (every session and token stops working at once) or enable a user."""
        values: dict[str, Any] = {"disabled_at": _now() if disabled else None}
        if disabled:
            values["session_version"] = users.c.session_version + 1
        action = "user.disable" if disabled else "user.enable"
        return self._change(name, values, by=by, action=action, detail={})

    def set_password(self, name: str, password: str, *, by: str) -> User:
        """A new password; every session signed in with the old one ends."""
        check_password(password)
        values = {
            "password_hash": generate_password_hash(password),
            "session_version": users.c.session_version + 1,
        }
        return self._change(name, values, by=by, action="user.password", detail={})

    def end_sessions(self, user_id: int) -> None:
        """Sign-out: every session cookie of this user made before now stops working."""
        with self.engine.begin() as conn:
            conn.execute(
                update(users)
                .where(users.c.id == user_id)
                .values(session_version=users.c.session_version + 1)
            )

    def _change(
        self, name: str, values: dict[str, Any], *, by: str, action: str, detail: dict[str, Any]
    ) -> User:
        with self.engine.begin() as conn:
            row = conn.execute(
                update(users).where(users.c.name == name).values(**values).returning(*users.c)
            ).first()
            if row is None:
                raise AccountError(f"no user named {name!r}")
            _audit(conn, by, action, name, detail)
        return _user(row)

    # --- tokens ---------------------------------------------------------------------

    def issue_token(self, user_id: int, *, label: str = "api", by: str = "agentloop") -> str:
        """A new API token for the user; shown once, only its digest is stored."""
        token = TOKEN_PREFIX + token_urlsafe(32)
        with self.engine.begin() as conn:
            owner = conn.execute(select(users.c.name).where(users.c.id == user_id)).scalar_one()
            conn.execute(
                insert(api_tokens).values(
                    user_id=user_id,
                    token_hash=_digest(token),
                    label=label[:120],
                    created_at=_now(),
                )
            )
            _audit(conn, by, "token.issue", owner, {"label": label[:120]})
        return token

    def tokens(self, name: str) -> list[Token]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(api_tokens)
                .join(users, users.c.id == api_tokens.c.user_id)
                .where(users.c.name == name)
                .order_by(api_tokens.c.id)
            )
            return [Token(r.id, r.label, r.created_at, r.last_used_at) for r in rows]

    def revoke_tokens(self, name: str, *, token_id: int | None = None, by: str) -> int:
        """Revoke one of the user's tokens (or all of them); returns how many."""
        with self.engine.begin() as conn:
            user_id = conn.execute(select(users.c.id).where(users.c.name == name)).scalar()
            if user_id is None:
                raise AccountError(f"no user named {name!r}")
            query = delete(api_tokens).where(api_tokens.c.user_id == user_id)
            if token_id is not None:
                query = query.where(api_tokens.c.id == token_id)
            revoked = conn.execute(query).rowcount
            _audit(conn, by, "token.revoke", name, {"token_id": token_id, "revoked": revoked})
        return int(revoked)

    def user_for_token(self, token: str) -> User | None:
        """The token's owner while enabled, or None; records when the token was used."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        with self.engine.begin() as conn:
            user_id = conn.execute(
                update(api_tokens)
                .where(api_tokens.c.token_hash == _digest(token))
                .values(last_used_at=_now())
                .returning(api_tokens.c.user_id)
            ).scalar_one_or_none()
        user = self.get(int(user_id)) if user_id is not None else None
        return None if user is None or user.disabled else user

    # --- audit ----------------------------------------------------------------------

    def audit_entries(self, *, subject: str | None = None, limit: int = 100) -> list[AuditEntry]:
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if subject is not None:
            query = query.where(audit_log.c.subject == subject)
        with self.engine.connect() as conn:
            return [
                AuditEntry(r.id, r.actor, r.action, r.subject, dict(r.detail), r.created_at)
                for r in conn.execute(query)
            ]


def _audit(conn: Connection, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
    conn.execute(
        insert(audit_log).values(
            actor=actor[:120],
            action=action,
            subject=subject[:120],
            detail=detail,
            created_at=_now(),
        )
    )
