"""Fixtures for the web app, notifications and the browser: a Flask test client
over the in-process harness, users and API tokens in the real database, a real
SMTP server (aiosmtpd) and a Slack webhook (http.server) on loopback ports, the
web app served over HTTP by werkzeug, and Debian's chromium driven by Playwright.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from secrets import token_hex
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.config import load_settings
from app.engine.models import RunStatus
from app.service import AgentService
from app.store.accounts import Accounts, Role, User
from app.store.repo import Store
from app.web import create_app
from tests.support.fixtures import Harness, require, steps

PASSWORD = "correct horse battery staple"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def csrf_token(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- people ---------------------------------------------------------------------------


@pytest.fixture
def accounts(store: Store) -> Accounts:
    return Accounts(store.engine)


@pytest.fixture
def make_user(accounts: Accounts) -> Callable[..., User]:
    """Users with unique names (the database is shared by the whole session)."""

    def make(prefix: str = "user", *, email: bool = True, role: Role = Role.APPROVER) -> User:
        name = f"{prefix}-{token_hex(4)}"
        address = f"{name}@example.com" if email else None
        return accounts.add_user(name, PASSWORD, email=address, role=role)

    return make


@pytest.fixture
def user(make_user: Callable[..., User]) -> User:
    return make_user("alice")


@pytest.fixture
def api_token(accounts: Accounts, user: User) -> str:
    return accounts.issue_token(user.id, label="tests")


# --- the app over the in-process harness ----------------------------------------------


@pytest.fixture
def web_app(harness: Harness) -> Flask:
    app = create_app({"TESTING": True, "AGENTLOOP_SERVICE": harness.service})
    return app


@pytest.fixture
def client(web_app: Flask) -> FlaskClient:
    return web_app.test_client()


def sign_in(client: FlaskClient, user: User, password: str = PASSWORD) -> None:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"name": user.name, "password": password, "csrf_token": csrf_token(page.text)},
    )
    assert response.status_code == 302, response.text


@pytest.fixture
def signed_in(client: FlaskClient, user: User) -> FlaskClient:
    sign_in(client, user)
    return client


# --- a real SMTP server ----------------------------------------------------------------


@dataclass
class Mailbox:
    """What the loopback SMTP server received, as parsed messages."""

    host: str
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        with self.lock:
            self.messages.append(parsed)
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if m["To"] == address]


def body_of(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    assert part is not None, f"no text/{subtype} part"
    return str(part.get_content())


@pytest.fixture
def mailbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mailbox]:
    """aiosmtpd on a free loopback port; the settings point SMTP at it."""
    from aiosmtpd.controller import Controller

    box = Mailbox(host="127.0.0.1", port=free_port())
    controller = Controller(box, hostname=box.host, port=box.port)
    controller.start()
    monkeypatch.setenv("AGENTLOOP_SMTP_HOST", box.host)
    monkeypatch.setenv("AGENTLOOP_SMTP_PORT", str(box.port))
    yield box
    controller.stop()


# --- a Slack incoming webhook ------------------------------------------------------------


@dataclass
class Webhook:
    url: str
    payloads: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0  # answer 500 to this many requests first


@pytest.fixture
def slack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    """http.server on a free loopback port, recording each JSON payload."""
    port = free_port()
    hook = Webhook(url=f"http://127.0.0.1:{port}/services/T000/B000/XXXX")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if hook.fail_next > 0:
                hook.fail_next -= 1
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"internal_error")
                return
            hook.payloads.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AGENTLOOP_SLACK_WEBHOOK_URL", hook.url)
    yield hook
    server.shutdown()
    server.server_close()


# --- the web app over HTTP, publishing to the real broker --------------------------------


@dataclass
class LiveWeb:
    url: str
    app: Flask
    service: AgentService


@pytest.fixture
def live_web(live_service: AgentService) -> Iterator[LiveWeb]:
    """The app served by werkzeug on a free loopback port (threaded), its runs
    advanced by whatever real workers the test starts."""
    from werkzeug.serving import make_server

    port = free_port()
    settings = load_settings(base_url=f"http://127.0.0.1:{port}")
    app = create_app({"AGENTLOOP_SETTINGS": settings, "AGENTLOOP_SERVICE": live_service})
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield LiveWeb(url=f"http://127.0.0.1:{port}", app=app, service=live_service)
    server.shutdown()


# --- a real browser ------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's chromium (scripts/ensure-browser.sh installs it) driven by Playwright."""
    if not CHROMIUM.exists():
        require("chromium", FileNotFoundError(f"{CHROMIUM} (run scripts/ensure-browser.sh)"))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def paused_run(harness: Harness, *, created_by: Any = "tests", **config: Any) -> str:
    """A run of two noop steps, waiting for approval of the first."""
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run(
        "approve me", config={"approval_required": ["noop"], **config}, created_by=created_by
    )
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    return run_id
