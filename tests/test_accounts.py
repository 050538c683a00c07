"""Accounts over real PostgreSQL: users with hashed passwords, API tokens kept as
digests, and `agentloop user add` from the terminal."""

from __future__ import annotations

import hashlib
from secrets import token_hex

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from app.cli import main
from app.store.accounts import AccountError, Accounts
from app.store.schema import api_tokens, users
from tests.support.web import PASSWORD


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{token_hex(4)}"


def test_a_user_signs_in_with_their_password_only(accounts: Accounts):
    name = unique()
    created = accounts.add_user(name, PASSWORD, email=f"{name}@example.com")
    assert accounts.authenticate(name, PASSWORD) == created
    assert accounts.authenticate(name, PASSWORD + "!") is None
    assert accounts.authenticate(unique("nobody"), PASSWORD) is None


def test_passwords_are_stored_hashed(accounts: Accounts, store):
    name = unique()
    accounts.add_user(name, PASSWORD)
    with store.engine.connect() as conn:
        stored = conn.execute(select(users.c.password_hash).where(users.c.name == name)).scalar()
    assert PASSWORD not in stored and stored.startswith(("scrypt:", "pbkdf2:"))


@pytest.mark.parametrize(
    ("name", "password", "email", "message"),
    [
        ("", PASSWORD, None, "user name"),
        ("has space", PASSWORD, None, "user name"),
        ("ok-name", "short", None, "at least 8"),
        ("ok-name", PASSWORD, "not-an-email", "not an email"),
    ],
)
def test_bad_accounts_are_refused_with_a_reason(accounts, name, password, email, message):
    with pytest.raises(AccountError, match=message):
        accounts.add_user(name, password, email=email)


def test_a_name_is_taken_once(accounts: Accounts):
    name = unique()
    accounts.add_user(name, PASSWORD)
    with pytest.raises(AccountError, match="already exists"):
        accounts.add_user(name, PASSWORD)


def test_api_tokens_are_stored_as_digests_and_name_their_user(accounts: Accounts, store):
    created = accounts.add_user(unique(), PASSWORD)
    token = accounts.issue_token(created.id, label="ci")
    assert accounts.user_for_token(token) == created
    assert accounts.user_for_token(token + "x") is None
    assert accounts.user_for_token("not-even-our-format") is None
    with store.engine.connect() as conn:
        row = conn.execute(select(api_tokens).where(api_tokens.c.user_id == created.id)).one()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert row.last_used_at is not None


def test_emails_are_found_by_user_name(accounts: Accounts):
    with_mail, without = unique("m"), unique("n")
    accounts.add_user(with_mail, PASSWORD, email="m@example.com")
    accounts.add_user(without, PASSWORD)
    assert accounts.emails_for((with_mail, without, "ghost")) == {with_mail: "m@example.com"}


def test_user_add_from_the_cli_prompts_and_prints_a_token(database_url, accounts: Accounts):
    name = unique("cli")
    result = CliRunner().invoke(
        main,
        ["user", "add", name, "--email", f"{name}@example.com", "--token"],
        input=f"{PASSWORD}\n{PASSWORD}\n",
    )
    assert result.exit_code == 0, result.output
    assert f"user {name} <{name}@example.com> created (operator)" in result.output
    token = result.output.strip().splitlines()[-1]
    found = accounts.user_for_token(token)
    assert found is not None and found.name == name
    assert accounts.authenticate(name, PASSWORD) == found


def test_user_add_explains_a_refusal_in_one_line(database_url):
    result = CliRunner().invoke(main, ["user", "add", "bad name", "--password", PASSWORD])
    assert result.exit_code == 2
    assert "agentloop: a user name is" in result.output
    assert "Traceback" not in result.output


def test_user_token_creates_another_token(database_url, accounts: Accounts):
    created = accounts.add_user(unique(), PASSWORD)
    result = CliRunner().invoke(
        main, ["user", "token", "create", created.name, "--label", "deploy bot"]
    )
    assert result.exit_code == 0, result.output
    assert accounts.user_for_token(result.output.strip()) == created
    missing = CliRunner().invoke(main, ["user", "token", "create", unique("ghost")])
    assert missing.exit_code == 2 and "no user named" in missing.output
