"""The engine imports no framework and no I/O module: it stays a pure core."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "app" / "engine"
FORBIDDEN = {
    "celery", "kombu", "redis", "sqlalchemy", "psycopg2", "flask", "anthropic", "httpx",
    "socket", "subprocess", "urllib", "requests", "os", "time", "random", "threading",
    "app.store", "app.tools", "app.planner", "app.service", "app.web", "tasks",
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_modules_import_nothing_impure():
    offenders = {}
    for path in sorted(ENGINE.glob("*.py")):
        bad = {
            name
            for name in imported_modules(path)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}
    assert len(list(ENGINE.glob("*.py"))) >= 5  # the check really looked at the engine
