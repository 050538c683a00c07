"""What views need: settings, the service, accounts — built once per process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from flask import current_app

from app import tracing
from app.config import Settings
from app.markdown_html import markdown_html
from app.service import AgentService
from app.store.accounts import Accounts
from app.web import present


class Deps:
    def __init__(self, settings: Settings, service: AgentService | None = None) -> None:
        self.settings = settings
        self._service = service
        if service is not None:
            tracing.instrument_engines(service.store.engines)
        self._accounts: Accounts | None = None
        self._lock = threading.Lock()

    @property
    def service(self) -> AgentService:
        # Built on first use, not in create_app: gunicorn forks after the app is
        # imported, and a database pool must not be shared across processes.
        with self._lock:
            if self._service is None:
                self._service = _build_service(self.settings)
                # A request's SQL as child spans of its span, when tracing is on.
                tracing.instrument_engines(self._service.store.engines)
            return self._service

    @property
    def accounts(self) -> Accounts:
        engine = self.service.store.engine
        with self._lock:
            if self._accounts is None:
                self._accounts = Accounts(engine)
            return self._accounts


def _build_service(settings: Settings) -> AgentService:
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    return build_service(settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier())


def deps() -> Deps:
    found: Deps = current_app.extensions["agentloop"]
    return found


def service() -> AgentService:
    return deps().service


def accounts() -> Accounts:
    return deps().accounts


def settings() -> Settings:
    return deps().settings


def present_filters() -> dict[str, Callable[..., Any]]:
    return {
        "age": present.age,
        "duration": present.duration,
        "pretty": present.pretty,
        "money": present.money,
        "stamp": present.stamp,
        "short": present.short,
        "outcome_preview": present.outcome_preview,
        "step_status": present.step_status,
        "markdown": markdown_html,
    }
