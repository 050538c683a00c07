"""Every page of the web app, with something on it, for the browser tests that walk
them all (tests/test_pages_layout.py, tests/test_accessibility.py).

The app is served over the in-process harness (`served` from tests/test_browser.py);
runs are advanced by harness.drain(), so no worker is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.config import load_settings
from app.engine.actions import PlanFinished, PlannerFatal
from app.notify import approval_link
from app.store.accounts import Role, User
from tests.support.fixtures import Harness, steps
from tests.support.web import paused_run

REPORT = """# Deploy report

Deployed **shop 1.1.0** to `staging` from PR #42; the build is at
<https://ci.example.com/builds/7f3a9c2e4b1d8a6f0c5e3b2a1d9f8e7c6b5a4d3c2b1a0f9e8d7c6b5a4>.

| check | result | took |
|---|---|---|
| unit tests | 11 passed | 4.2 s |
| smoke test | answered 200 | 0.3 s |

1. checked out PR #42
2. built `shop-1.1.0.tar.gz`
3. deployed, after setting `STAGING_DATABASE_URL`
"""
LONG_ERROR = (
    "tool deploy failed [permanent]: missing env var STAGING_DATABASE_URL_FOR_THE_SHOP_SERVICE "
    "in /srv/staging/releases/shop-1.1.0-build-7f3a9c2e4b1d8a6f0c5e3b2a1d9f8e7c6b5a4d3c/.env"
)


@dataclass
class Site:
    """The served app, an admin to sign in as, and a path for each page."""

    url: str
    admin: User
    harness: Harness
    pages: dict[str, str] = field(default_factory=dict)

    def approval_path(self) -> str:
        """The signed link (path only) to a fresh approval waiting for the admin."""
        run_id = paused_run(self.harness, created_by="ada", approvers=[self.admin.name])
        pending = self.harness.service.status(run_id).pending_approval
        assert pending is not None
        link = approval_link(load_settings(), pending.id, self.admin.name, pending.args_hash)
        return "/approvals/" + link.rsplit("/approvals/", 1)[1]


@pytest.fixture
def site(served: str, harness: Harness, make_user: Callable[..., User]) -> Site:
    admin = make_user("admin", role=Role.ADMIN)
    make_user("operator-with-a-rather-long-name", role=Role.OPERATOR)
    make_user("viewer", role=Role.VIEWER, email=False)
    site = Site(url=served, admin=admin, harness=harness)
    completed = finished(harness, REPORT, created_by=admin.name)
    failed = failing(harness, LONG_ERROR, created_by="ada")
    waiting = paused_run(harness, created_by="ada", approvers=[admin.name])
    # A cancelled run's badge too, for the contrast check.
    harness.service.cancel(harness.service.create_run("cancelled at once"), by="tests")
    harness.drain()
    site.pages = {
        "login": "/login",
        "runs-list": "/",
        "new-run": "/runs/new",
        "run-waiting": f"/runs/{waiting}",
        "run-completed": f"/runs/{completed}",
        "run-failed": f"/runs/{failed}",
        "admin-users": "/admin/users",
        "error": "/runs/no-such-run",
        "approval-problem": "/approvals/not-a-valid-link",
    }
    return site


def finished(harness: Harness, report: str, **options: Any) -> str:
    harness.planner.script = [steps("noop", "noop"), PlanFinished(report=report)]
    run_id = harness.service.create_run(
        "deploy PR 42 of the shop to staging, run the tests, report the results", **options
    )
    harness.drain()
    return run_id


def failing(harness: Harness, error: str, **options: Any) -> str:
    harness.planner.script = [PlannerFatal(error=error)]
    run_id = harness.service.create_run("deploy PR 43 to staging", **options)
    harness.drain()
    return run_id
