"""People: users who sign in to the web app, and the bearer tokens of the JSON API.

Passwords are kept as werkzeug hashes (scrypt); API tokens as SHA-256 digests,
so neither table grants anything if it leaks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from secrets import token_urlsafe

from sqlalchemy import Engine, Row, insert, select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from app.store.schema import api_tokens, users

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,79}$")
MIN_PASSWORD = 8
TOKEN_PREFIX = "al_"
# Checked against when the name is unknown, so a wrong name takes as long as a
# wrong password and sign-in does not reveal which names exist.
_DUMMY_HASH = generate_password_hash("not-a-real-password")


class AccountError(ValueError):
    """A user cannot be created as asked; the message says why."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    email: str | None

    def answers_to(self, names: tuple[str, ...]) -> bool:
        """True when `names` (approvers: names or emails) include this user."""
        wanted = {n.casefold() for n in names}
        return self.name.casefold() in wanted or bool(
            self.email and self.email.casefold() in wanted
        )


def _user(row: Row[object]) -> User:
    return User(id=int(row.id), name=str(row.name), email=row.email)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add_user(self, name: str, password: str, *, email: str | None = None) -> User:
        """Create a user. Raises AccountError (bad name, short password, name taken)."""
        if not NAME_PATTERN.match(name):
            raise AccountError(
                "a user name is 1-80 letters, digits, '.', '_', '@' or '-', starting with a "
                "letter or digit"
            )
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"the password needs at least {MIN_PASSWORD} characters")
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
                        created_at=datetime.now(UTC),
                    )
                    .returning(users.c.id)
                ).scalar_one()
        except IntegrityError:
            raise AccountError(f"a user named {name!r} already exists") from None
        return User(id=int(user_id), name=name, email=email)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs; None otherwise (same time either way)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        stored = row.password_hash if row is not None else _DUMMY_HASH
        if not check_password_hash(stored, password) or row is None:
            return None
        return _user(row)

    def get(self, user_id: int) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.id == user_id)).first()
        return _user(row) if row is not None else None

    def by_name(self, name: str) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        return _user(row) if row is not None else None

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

    def issue_token(self, user_id: int, *, label: str = "api") -> str:
        """A new API token for the user; shown once, only its digest is stored."""
        token = TOKEN_PREFIX + token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                insert(api_tokens).values(
                    user_id=user_id,
                    token_hash=_digest(token),
                    label=label[:120],
                    created_at=datetime.now(UTC),
                )
            )
        return token

    def user_for_token(self, token: str) -> User | None:
        """The token's owner, or None for an unknown token; records when it was used."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self.engine.begin() as conn:
            user_id = conn.execute(
                update(api_tokens)
                .where(api_tokens.c.token_hash == _digest(token))
                .values(last_used_at=datetime.now(UTC))
                .returning(api_tokens.c.user_id)
            ).scalar_one_or_none()
        return self.get(int(user_id)) if user_id is not None else None
