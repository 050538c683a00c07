"""Demo tools: check out, build, deploy, test and report on the example shop.

Everything is real work on examples/shop inside the run's workspace:

    <workspace>/src/                      checkout_pr: a fresh copy with the PR applied
    <workspace>/src/dist/build.json       build: the artifact's path and sha256
    <workspace>/checkout.json             checkout_pr: which PR, which files changed
    <workspace>/staging/<env>/            deploy: the unpacked artifact + DEPLOY_MANIFEST.json
    <workspace>/staging/<env>/TEST_RESULTS.json   written by the deployment's run_tests.py
    <workspace>/report.md                 report

Settings read from ctx.settings: "examples_dir" (default: the repository's
examples/), "slack_webhook_url" (optional), "outbox_dir" (default:
<workspace>/outbox) where a report that is not posted is written instead.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tarfile
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.tools.builtin import (
    ProcessOutput,
    raise_for_exit,
    run_process,
    safe_env,
    send_request,
    shown_value,
)
from app.tools.registry import Tool, ToolContext, ToolError, ToolResult, tool

DEFAULT_EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
SUBPROCESS_TIMEOUT = 100.0
DEMO_TOOL_TIMEOUT = 120.0
SLACK_TIMEOUT = 10.0
MANIFEST = "DEPLOY_MANIFEST.json"
TEST_RESULTS = "TEST_RESULTS.json"
# Left out of a checkout: build output and caches of the pristine example.
NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc", "dist", ".cache", "*.db", "prs")


# --- paths ------------------------------------------------------------------------


def _shop_dir(ctx: ToolContext) -> Path:
    configured = ctx.settings.get("examples_dir")
    # Resolved: the patch path is handed to git running in another directory.
    shop = ((Path(configured) if configured else DEFAULT_EXAMPLES_DIR) / "shop").resolve()
    if not (shop / "build.py").is_file():
        raise ToolError(f"the example project is missing: no build.py in {shop}")
    return shop


def _src(ctx: ToolContext) -> Path:
    src = ctx.workspace / "src"
    if not src.is_dir():
        raise ToolError("nothing is checked out in the workspace; run checkout_pr first")
    return src


def _staging(ctx: ToolContext, env: str) -> Path:
    return ctx.workspace / "staging" / env


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _python(script: str, *, cwd: Path, ctx: ToolContext) -> ProcessOutput:
    """Run `python script` in cwd with the run's env (same interpreter as the worker)."""
    env = safe_env({**ctx.env, "PYTHONDONTWRITEBYTECODE": "1"})
    return run_process([sys.executable, script], cwd=cwd, env=env, timeout=SUBPROCESS_TIMEOUT)


# --- checkout_pr ------------------------------------------------------------------


class CheckoutArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pr: int = Field(gt=0, description="The pull request number, e.g. 42.")


@tool(
    name="checkout_pr",
    description=(
        "Check out a pull request of the example shop: a fresh copy of the project in the "
        "workspace's src/ with the PR's patch applied (git apply). Returns the files the PR "
        "changes. An unknown PR or a patch that does not apply is a permanent failure. "
        "Idempotent: each call starts again from a clean copy."
    ),
    args=CheckoutArgs,
    idempotent=True,
    timeout=DEMO_TOOL_TIMEOUT,
)
def checkout_pr(args: CheckoutArgs, ctx: ToolContext) -> ToolResult:
    shop = _shop_dir(ctx)
    patch = shop / "prs" / f"{args.pr}.patch"
    if not patch.is_file():
        known = sorted(p.stem for p in (shop / "prs").glob("*.patch"))
        raise ToolError(f"unknown PR #{args.pr}; known PRs: {', '.join(known) or 'none'}")
    src = ctx.workspace / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(shop, src, ignore=NOT_COPIED)
    files = _apply_patch(patch, src=src, ctx=ctx)
    record = {"pr": args.pr, "patch": patch.name, "files": files}
    (ctx.workspace / "checkout.json").write_text(json.dumps(record, indent=2) + "\n")
    return ToolResult(
        result=record, summary=f"checked out PR #{args.pr} ({len(files)} files changed)"
    )


def _apply_patch(patch: Path, *, src: Path, ctx: ToolContext) -> list[str]:
    """Apply `patch` in `src` with git apply; returns the changed files.

    The workspace may sit inside some git repository (the service's own
    checkout); git apply would then resolve paths against that repository and
    silently skip them. GIT_CEILING_DIRECTORIES stops git from looking above src.
    """
    env = safe_env({"GIT_CEILING_DIRECTORIES": str(src.parent.resolve())})
    argv = ["git", "apply", "--numstat", "--apply", str(patch)]
    result = run_process(argv, cwd=src, env=env, timeout=SUBPROCESS_TIMEOUT)
    if result.exit_code != 0:
        raise ToolError(f"{patch.name} does not apply cleanly:\n{result.tail()}")
    # --numstat lines: "<added>\t<deleted>\t<path>"
    return [line.split("\t")[-1] for line in result.output.splitlines() if "\t" in line]


# --- build ------------------------------------------------------------------------


class BuildArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


@tool(
    name="build",
    description=(
        "Build the checked-out shop (its build.py) into a reproducible tarball. Returns "
        '{"artifact", "sha256", "version"}; the same sources always give the same sha256. '
        "Needs checkout_pr first. A failing build is permanent. Idempotent."
    ),
    args=BuildArgs,
    idempotent=True,
    timeout=DEMO_TOOL_TIMEOUT,
)
def build(args: BuildArgs, ctx: ToolContext) -> ToolResult:
    src = _src(ctx)
    raise_for_exit(_python("build.py", cwd=src, ctx=ctx), "build.py")
    record = _build_record(src)
    artifact = (src / record["artifact"]).relative_to(ctx.workspace).as_posix()
    result = {"artifact": artifact, "sha256": record["sha256"], "version": record["version"]}
    return ToolResult(
        result=result,
        summary=f"built shop {record['version']} ({artifact}, sha256 {record['sha256'][:12]})",
    )


# --- deploy -----------------------------------------------------------------------


class DeployArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: Literal["staging"] = Field(description="The environment to deploy to.")


def database_var(env: str) -> str:
    """The env var a deploy to `env` needs, e.g. STAGING_DATABASE_URL."""
    return f"{env.upper()}_DATABASE_URL"


@tool(
    name="deploy",
    description=(
        "Deploy the last build to an environment: verifies the artifact's sha256, unpacks it "
        "into the workspace's staging/<env>/ (replacing any earlier deploy) and writes a "
        "deploy manifest. Needs build first and the env var <ENV>_DATABASE_URL (e.g. "
        "STAGING_DATABASE_URL); without it, it fails with 'missing env var <NAME>'. "
        "Requires human approval. Not idempotent."
    ),
    args=DeployArgs,
    requires_approval=True,
    idempotent=False,
    timeout=DEMO_TOOL_TIMEOUT,
    summarize=lambda args: f"deploy to {args['env']}",
)
def deploy(args: DeployArgs, ctx: ToolContext) -> ToolResult:
    var = database_var(args.env)
    database_url = ctx.env.get(var, "")
    if not database_url:
        raise ToolError(f"missing env var {var}: the {args.env} deploy needs its database URL")
    src = _src(ctx)
    record = _build_record(src)
    artifact = _verified_artifact(src, record)
    target = _staging(ctx, args.env)
    shutil.rmtree(target, ignore_errors=True)  # a deploy replaces the previous one whole
    target.mkdir(parents=True)
    with tarfile.open(artifact) as tar:
        tar.extractall(target, filter="data")  # refuses absolute paths and ../ escapes
    manifest = {
        "env": args.env,
        "version": record["version"],
        "artifact": artifact.name,
        "artifact_sha256": record["sha256"],
        "database_url": database_url,
        "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": ctx.run_id,
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    result = {**manifest, "database_url": shown_value(var, database_url)}
    result["path"] = target.relative_to(ctx.workspace).as_posix()
    return ToolResult(
        result=result,
        summary=f"deployed shop {record['version']} to {args.env} (sha256 {record['sha256'][:12]})",
    )


def _build_record(src: Path) -> dict[str, str]:
    path = src / "dist" / "build.json"
    if not path.is_file():
        raise ToolError("nothing is built yet; run build first")
    record: dict[str, str] = _read_json(path)
    return record


def _verified_artifact(src: Path, record: Mapping[str, str]) -> Path:
    """The built artifact, after checking it is the one build.json describes."""
    artifact = src / record["artifact"]
    if not artifact.is_file():
        raise ToolError(f"no build artifact at {record['artifact']}; run build first")
    actual = hashlib.sha256(artifact.read_bytes()).hexdigest()
    if actual != record["sha256"]:
        raise ToolError(f"{artifact.name} changed since it was built; run build again")
    return artifact


# --- run_tests --------------------------------------------------------------------


class RunTestsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: str = Field("staging", pattern=r"^[a-z][a-z0-9_-]*$")


@tool(
    name="run_tests",
    description=(
        "Run the shop's test suite against a deployment (its run_tests.py in "
        "staging/<env>/). The first run after a deploy warms a fixture cache and exits 75: "
        "a transient failure, retried with backoff. Returns the test counts on success; a "
        "failing test is a permanent failure quoting the output. Needs deploy first. "
        "Idempotent."
    ),
    args=RunTestsArgs,
    idempotent=True,
    timeout=DEMO_TOOL_TIMEOUT,
)
def run_tests(args: RunTestsArgs, ctx: ToolContext) -> ToolResult:
    deployed = _staging(ctx, args.env)
    if not (deployed / MANIFEST).is_file():
        raise ToolError(f"nothing is deployed to {args.env}; run deploy first")
    raise_for_exit(_python("run_tests.py", cwd=deployed, ctx=ctx), "run_tests.py")
    results = _read_json(deployed / TEST_RESULTS)
    counts = {k: results[k] for k in ("tests", "failures", "errors", "skipped")}
    return ToolResult(
        result={**counts, "env": args.env, "output": results["output"][-2000:]},
        summary=f"{counts['tests']} tests passed on {args.env} ({counts['skipped']} skipped)",
    )


# --- report -----------------------------------------------------------------------


class ReportArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)


@tool(
    name="report",
    description=(
        "Write a markdown report of what this run did (checkout, build, deploys, test "
        "results, read from the workspace) to report.md and post it to Slack, or to a local "
        'outbox when no Slack webhook is configured. Returns {"report", "posted_to"}. '
        "Idempotent: a retry re-posts the same report."
    ),
    args=ReportArgs,
    idempotent=True,
    timeout=DEMO_TOOL_TIMEOUT,
)
def report(args: ReportArgs, ctx: ToolContext) -> ToolResult:
    markdown = build_report(args.title, ctx)
    (ctx.workspace / "report.md").write_text(markdown)
    payload = {"text": markdown}
    webhook = str(ctx.settings.get("slack_webhook_url") or "")
    if webhook:
        _post_json(webhook, payload)
        posted_to, where = "slack", "posted to Slack"
    else:
        outbox = _write_outbox(payload, ctx)
        posted_to, where = str(outbox), f"no Slack webhook configured; written to {outbox}"
    return ToolResult(
        result={"report": markdown, "posted_to": posted_to},
        summary=f"report '{args.title}' {where}",
    )


def build_report(title: str, ctx: ToolContext) -> str:
    """The markdown report, from the records the other demo tools left in the workspace."""
    lines = [f"# {title}", ""]
    lines += _checkout_lines(ctx.workspace / "checkout.json")
    lines += _build_lines(ctx.workspace / "src" / "dist" / "build.json")
    staging = ctx.workspace / "staging"
    deployed = sorted(staging.iterdir()) if staging.is_dir() else []
    if not deployed:
        lines.append("- **Deploy:** not deployed")
    for target in deployed:
        lines += _deploy_lines(target)
    lines += ["", f"_Run `{ctx.run_id}`, from the records in its workspace._", ""]
    return "\n".join(lines)


def _checkout_lines(path: Path) -> list[str]:
    if not path.is_file():
        return ["- **Checkout:** not checked out"]
    record = _read_json(path)
    files = ", ".join(f"`{f}`" for f in record["files"])
    return [f"- **Checkout:** PR #{record['pr']}: {len(record['files'])} files changed ({files})"]


def _build_lines(path: Path) -> list[str]:
    if not path.is_file():
        return ["- **Build:** not built"]
    record = _read_json(path)
    name = Path(record["artifact"]).name
    return [f"- **Build:** shop {record['version']}, `{name}`, sha256 `{record['sha256'][:12]}`"]


def _deploy_lines(target: Path) -> list[str]:
    manifest_path = target / MANIFEST
    if not manifest_path.is_file():
        return [f"- **Deploy ({target.name}):** incomplete (no manifest)"]
    manifest = _read_json(manifest_path)
    env = manifest["env"]
    database = shown_value(database_var(env), manifest["database_url"])
    lines = [
        f"- **Deploy ({env}):** shop {manifest['version']} at {manifest['deployed_at']}, "
        f"database `{database}`"
    ]
    results_path = target / TEST_RESULTS
    if not results_path.is_file():
        return [*lines, f"- **Tests ({env}):** not run"]
    results = _read_json(results_path)
    verdict = "passed" if results["ok"] else "FAILED"
    return [
        *lines,
        f"- **Tests ({env}):** {verdict}: {results['tests']} run, {results['failures']} "
        f"failures, {results['errors']} errors, {results['skipped']} skipped "
        f"({results['finished_at']})",
    ]


def _post_json(url: str, payload: Mapping[str, Any]) -> None:
    """POST payload as JSON; raises ToolError (transient for 429/5xx/network, else permanent)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    send_request(request, timeout=SLACK_TIMEOUT)


def _write_outbox(payload: Mapping[str, Any], ctx: ToolContext) -> Path:
    configured = ctx.settings.get("outbox_dir")
    outbox = Path(configured) if configured else ctx.workspace / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.run_id)
    path = outbox / f"slack-{safe_id}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


TOOLS: list[Tool] = [checkout_pr, build, deploy, run_tests, report]
