"""The package as a stranger installs it: a wheel built from this checkout, installed
into a fresh virtualenv outside the checkout, runs `agentloop demo` to the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.fixtures import CI

DEMO_TOOLS = {"checkout_pr", "build", "deploy", "run_tests", "report"}
INSTALL_TIMEOUT = 150
DEMO_TIMEOUT = 90


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=INSTALL_TIMEOUT,
    )
    (built,) = out.glob("agentloop-*.whl")
    return built


def test_the_wheel_ships_the_sample_project_license_and_dependencies(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    assert "app/examples/shop/build.py" in names and "app/examples/shop/prs/42.patch" in names
    assert "app/planner/runbooks/deploy_pr.toml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = meta.get_all("Requires-Dist") or []
    core = [r for r in requires if "extra ==" not in r]
    for name in ("click", "jinja2", "werkzeug", "itsdangerous", "wtforms", "celery", "flask"):
        (found,) = [r for r in core if re.match(rf"{name}\b(?!-)", r, flags=re.I)]
        assert "<" in found, f"{found}: the major version is not bounded"
    run_extra = [r for r in requires if 'extra == "run"' in r]
    assert any(r.startswith("honcho") for r in run_extra)
    assert any(r.startswith("flower") for r in run_extra)
    assert not any(r.startswith(("honcho", "flower")) for r in core)


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv (no system site-packages) with the wheel and its dependencies,
    pinned by constraints.txt, from the package index this machine uses."""
    home = tmp_path_factory.mktemp("fresh-venv")
    assert not home.is_relative_to(ROOT)
    venv.EnvBuilder(with_pip=True, clear=True).create(home)
    done = subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"), str(wheel)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
    )  # fmt: skip
    if done.returncode != 0:
        message = f"pip install of the wheel failed: {done.stderr[-2000:]}"
        if CI:
            pytest.fail(message)
        pytest.skip(message + " (no package index reachable?)")
    yield home


def stranger_env() -> dict[str, str]:
    """The environment of someone who has never seen this checkout."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTLOOP_", "VIRTUAL_ENV"))
        and k not in ("DATABASE_URL", "CELERY_BROKER_URL", "PYTHONPATH")
    }


@pytest.mark.slow
def test_a_fresh_virtualenv_runs_the_demo(installed: Path, tmp_path: Path):
    """`pip install <wheel>` then `yes | agentloop demo` exits 0 (slow: about a minute)."""
    answers = "y\n" * 10
    demo = subprocess.run(
        [str(installed / "bin" / "agentloop"), "demo"],
        input=answers,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=stranger_env(),
        timeout=DEMO_TIMEOUT,
    )
    out = demo.stdout
    assert demo.returncode == 0, out[-4000:] + demo.stderr[-4000:]
    assert "run completed" in out and "example project is missing" not in out
    # The checkout is not what ran: the installed package and its copy of the shop did.
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import app, app.wiring; print(app.__file__); print(app.wiring.EXAMPLES_DIR)"],
        capture_output=True, text=True, cwd=tmp_path, env=stranger_env(), check=True,
    ).stdout.split()  # fmt: skip
    assert all(not Path(p).is_relative_to(ROOT) for p in where), where


def test_a_fresh_virtualenv_lists_only_the_configured_tools(installed: Path, tmp_path: Path):
    listed = subprocess.run(
        [str(installed / "bin" / "agentloop"), "tools"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=stranger_env(),
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines() if line[:1].isalpha()}
    assert {"shell", "http_request", "set_env"} <= names, names
    assert not names & DEMO_TOOLS and "shell  [builtin]" in listed.stdout
