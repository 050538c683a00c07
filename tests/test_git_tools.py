"""The git and GitHub tools against real git and a loopback GitHub: a bare repository
made here (a branch and a refs/pull/7/head ref pushed to it), served also over git's
dumb HTTP by tests/support/fake_github.py, which stands in for the REST API. Never the
internet."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.engine.actions import PlanProduced, StepFailed, StepOutcome, StepSucceeded
from app.engine.models import ErrorClass, PlannedStep, RunStatus
from app.tools.git import git_checkout_pr, git_diff
from app.tools.github import github_comment, github_pr, github_status
from app.tools.registry import Tool, ToolContext, load_registry, run_tool
from tests.support.fake_github import FakeGitHub
from tests.support.fixtures import Harness

TOKEN = "ghp_testTOKEN0123456789abcdefSECRET"
BASIC = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
REPO = "acme/shop"


# --- a real repository, a fake GitHub ------------------------------------------------


def git(*argv: str, cwd: Path) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd),
        "GIT_AUTHOR_NAME": "Ada",
        "GIT_AUTHOR_EMAIL": "ada@example.com",
        "GIT_COMMITTER_NAME": "Ada",
        "GIT_COMMITTER_EMAIL": "ada@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    done = subprocess.run(
        ["git", *argv], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@dataclass
class Origin:
    bare: Path
    main_sha: str
    pr_sha: str
    feature_sha: str


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    """served/acme/shop.git: main (one commit), feature (+1 commit), refs/pull/7/head
    (feature +1 more commit), made with real git and served-ready (update-server-info)."""
    work = tmp_path / "author"
    work.mkdir()
    bare = tmp_path / "served" / "acme" / "shop.git"
    bare.parent.mkdir(parents=True)
    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare), cwd=tmp_path)
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    (work / "app.py").write_text("print('hello')\n")
    (work / ".gitignore").write_text("build/\n")
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", "initial", cwd=work)
    main_sha = git("rev-parse", "HEAD", cwd=work)
    git("switch", "--quiet", "-c", "feature", cwd=work)
    (work / "app.py").write_text("print('hello')\nprint('feature')\n")
    git("commit", "--quiet", "-am", "feature work", cwd=work)
    feature_sha = git("rev-parse", "HEAD", cwd=work)
    (work / "README.md").write_text("# shop\n")
    git("add", "README.md", cwd=work)
    git("commit", "--quiet", "-m", "Add a README", cwd=work)
    pr_sha = git("rev-parse", "HEAD", cwd=work)
    git("push", "--quiet", str(bare), f"{main_sha}:refs/heads/main", cwd=work)
    git("push", "--quiet", str(bare), f"{feature_sha}:refs/heads/feature", cwd=work)
    git("push", "--quiet", str(bare), f"{pr_sha}:refs/pull/7/head", cwd=work)
    git("update-server-info", cwd=bare)
    return Origin(bare=bare, main_sha=main_sha, pr_sha=pr_sha, feature_sha=feature_sha)


@pytest.fixture
def gh(origin: Origin, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    with FakeGitHub(token=TOKEN, git_root=origin.bare.parents[1]) as fake:
        fake.add_pr(
            REPO, 7, title="Add a README", head_ref="feature", head_sha=origin.pr_sha,
            base_ref="main", base_sha=origin.main_sha, user="ada",
        )  # fmt: skip
        monkeypatch.setenv("GITHUB_API_URL", fake.url)
        monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
        monkeypatch.delenv("GITHUB_SERVER_URL", raising=False)
        yield fake


@dataclass
class Run:
    workspace: Path
    key: str = "run-1:v1:p1"

    def call(self, tool: Tool, args: dict[str, Any]) -> StepOutcome:
        ctx = ToolContext(
            run_id="run-1", step_id=1, idempotency_key=self.key, workspace=self.workspace, env={}
        )
        return run_tool(tool, args, ctx, timeout=tool.timeout)

    def ok(self, tool: Tool, args: dict[str, Any]) -> StepSucceeded:
        outcome = self.call(tool, args)
        assert isinstance(outcome, StepSucceeded), outcome
        assert TOKEN not in repr(outcome) and BASIC not in repr(outcome)
        return outcome

    def fails(self, tool: Tool, args: dict[str, Any], error_class: ErrorClass) -> StepFailed:
        outcome = self.call(tool, args)
        assert isinstance(outcome, StepFailed), outcome
        assert outcome.error_class is error_class, outcome
        assert TOKEN not in outcome.error and BASIC not in outcome.error
        return outcome


@pytest.fixture
def run(tmp_path: Path) -> Run:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return Run(workspace=workspace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_url(gh: FakeGitHub) -> str:
    return f"{gh.url}/git/{REPO}.git"


# --- git_checkout_pr ---------------------------------------------------------------------


def test_checkout_pr_ref_from_a_bare_repository(run: Run, origin: Origin) -> None:
    done = run.ok(git_checkout_pr, {"repo_url": str(origin.bare), "pr": 7})
    assert done.result["sha"] == origin.pr_sha
    assert done.result["ref"] == "refs/pull/7/head"
    assert done.result["subject"] == "Add a README"
    assert done.result["path"] == "repo"
    checkout = run.workspace / "repo"
    assert (checkout / "README.md").read_text() == "# shop\n"
    assert "feature" in (checkout / "app.py").read_text()


def test_checkout_again_leaves_the_same_clean_checkout(run: Run, origin: Origin) -> None:
    args = {"repo_url": f"file://{origin.bare}", "pr": 7}
    first = run.ok(git_checkout_pr, args)
    checkout = run.workspace / "repo"
    (checkout / "app.py").write_text("edited\n")
    (checkout / "stray.txt").write_text("left behind\n")
    (checkout / "build").mkdir()
    (checkout / "build" / "out.bin").write_text("ignored output\n")
    second = run.ok(git_checkout_pr, args)
    assert second.result == first.result
    assert "feature" in (checkout / "app.py").read_text()
    assert not (checkout / "stray.txt").exists() and not (checkout / "build").exists()
    assert git("status", "--porcelain", cwd=checkout) == ""


def test_checkout_a_branch(run: Run, origin: Origin) -> None:
    done = run.ok(git_checkout_pr, {"repo_url": str(origin.bare), "branch": "feature"})
    assert done.result["sha"] == origin.feature_sha
    assert done.result["ref"] == "refs/heads/feature"


def test_checkout_of_a_missing_pr_is_permanent(run: Run, origin: Origin) -> None:
    failed = run.fails(
        git_checkout_pr, {"repo_url": str(origin.bare), "pr": 99}, ErrorClass.PERMANENT
    )
    assert "PR #99" in failed.error and "does not exist" in failed.error


def test_checkout_of_a_missing_branch_is_permanent(run: Run, origin: Origin) -> None:
    args = {"repo_url": str(origin.bare), "branch": "nope"}
    assert "does not exist" in run.fails(git_checkout_pr, args, ErrorClass.PERMANENT).error


def test_checkout_of_a_missing_repository_is_permanent(run: Run, tmp_path: Path) -> None:
    args = {"repo_url": str(tmp_path / "nowhere.git"), "pr": 7}
    run.fails(git_checkout_pr, args, ErrorClass.PERMANENT)


@pytest.mark.parametrize(
    "args",
    [
        {"repo_url": "https://x-access-token:ghp_abc@github.com/a/b.git", "pr": 1},
        {"repo_url": "https://user@github.com/a/b.git", "pr": 1},
        {"repo_url": "ext::sh -c touch% /tmp/pwned", "pr": 1},
        {"repo_url": "--upload-pack=touch /tmp/pwned", "pr": 1},
        {"repo_url": "relative/path", "pr": 1},
        {"repo_url": "/srv/a.git", "pr": 1, "branch": "main"},
        {"repo_url": "/srv/a.git"},
        {"repo_url": "/srv/a.git", "branch": "-x"},
        {"repo_url": "/srv/a.git", "branch": "a..b"},
        {"repo_url": "/srv/a.git", "pr": 0},
        {"repo_url": "/srv/a.git", "pr": 1, "path": "../outside"},
        {"repo_url": "/srv/a.git", "pr": 1, "path": "."},
    ],
)
def test_checkout_refuses_bad_arguments(run: Run, args: dict[str, Any]) -> None:
    run.fails(git_checkout_pr, args, ErrorClass.PERMANENT)


def test_checkout_refuses_a_directory_that_is_not_a_checkout(run: Run, origin: Origin) -> None:
    (run.workspace / "repo").mkdir()
    (run.workspace / "repo" / "notes.txt").write_text("mine\n")
    args = {"repo_url": str(origin.bare), "pr": 7}
    assert "not a git checkout" in run.fails(git_checkout_pr, args, ErrorClass.PERMANENT).error
    assert (run.workspace / "repo" / "notes.txt").exists()


def test_checkout_over_http_sends_the_token_in_a_header_only(run: Run, gh: FakeGitHub) -> None:
    done = run.ok(git_checkout_pr, {"repo_url": http_url(gh), "pr": 7})
    assert done.result["subject"] == "Add a README"
    fetched = gh.received("GET", "/git/")
    assert fetched and all(r.headers.get("Authorization") == f"Basic {BASIC}" for r in fetched)
    config = (run.workspace / "repo" / ".git" / "config").read_text()
    assert http_url(gh) in config
    assert TOKEN not in config and BASIC not in config
    for leftover in (run.workspace / "repo" / ".git").rglob("*"):
        if leftover.is_file() and leftover.stat().st_size < 1_000_000:
            data = leftover.read_bytes()
            assert TOKEN.encode() not in data and BASIC.encode() not in data, leftover


def test_checkout_over_http_with_a_refused_token_says_what_to_fix(
    run: Run, gh: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_wrongWRONGwrong")
    failed = run.fails(git_checkout_pr, {"repo_url": http_url(gh), "pr": 7}, ErrorClass.PERMANENT)
    assert "GITHUB_TOKEN" in failed.error
    assert "ghp_wrongWRONGwrong" not in failed.error


def test_the_token_is_not_sent_to_another_host(run: Run, gh: FakeGitHub, origin: Origin) -> None:
    with FakeGitHub(git_root=origin.bare.parents[1]) as elsewhere:
        run.ok(git_checkout_pr, {"repo_url": f"{elsewhere.url}/git/{REPO}.git", "pr": 7})
        fetched = elsewhere.received("GET", "/git/")
    assert fetched and not any("Authorization" in r.headers for r in fetched)


def test_checkout_from_a_server_that_refuses_connections_is_transient(run: Run) -> None:
    url = f"http://127.0.0.1:{free_port()}/acme/shop.git"
    failed = run.fails(git_checkout_pr, {"repo_url": url, "pr": 7}, ErrorClass.TRANSIENT)
    assert failed.not_applied


# --- git_diff ------------------------------------------------------------------------


def test_diff_of_the_pr_against_its_base(run: Run, origin: Origin) -> None:
    run.ok(git_checkout_pr, {"repo_url": str(origin.bare), "pr": 7})
    done = run.ok(git_diff, {"base": "main"})  # main was never fetched: it is now
    assert done.result["base_sha"] == origin.main_sha
    assert done.result["head_sha"] == origin.pr_sha
    assert sorted(f["path"] for f in done.result["files"]) == ["README.md", "app.py"]
    assert (done.result["insertions"], done.result["deletions"]) == (2, 0)
    assert "+print('feature')" in done.result["diff"] and "+# shop" in done.result["diff"]
    assert not done.result["truncated"]
    assert run.ok(git_diff, {"base": "main"}).result == done.result


def test_diff_limited_to_paths_and_without_merge_base(run: Run, origin: Origin) -> None:
    run.ok(git_checkout_pr, {"repo_url": str(origin.bare), "pr": 7})
    done = run.ok(
        git_diff, {"base": origin.feature_sha, "paths": ["README.md"], "merge_base": False}
    )
    assert [f["path"] for f in done.result["files"]] == ["README.md"]


def test_diff_output_is_bounded(run: Run, origin: Origin, tmp_path: Path) -> None:
    work = tmp_path / "big"
    git("clone", "--quiet", str(origin.bare), str(work), cwd=tmp_path)
    (work / "big.txt").write_text("".join(f"line {i} of a large change\n" for i in range(20_000)))
    git("add", "big.txt", cwd=work)
    git("commit", "--quiet", "-m", "big", cwd=work)
    git("push", "--quiet", "origin", "HEAD:refs/pull/8/head", cwd=work)
    run.ok(git_checkout_pr, {"repo_url": str(origin.bare), "pr": 8})
    done = run.ok(git_diff, {"base": "main"})
    assert done.result["truncated"] and done.result["bytes"] > 400_000
    assert len(done.result["diff"]) < 20_000
    assert done.result["files"][0]["added"] == 20_000


def test_diff_against_a_missing_base_is_permanent(run: Run, origin: Origin) -> None:
    run.ok(git_checkout_pr, {"repo_url": str(origin.bare), "pr": 7})
    failed = run.fails(git_diff, {"base": "no-such-branch"}, ErrorClass.PERMANENT)
    assert "no-such-branch" in failed.error


def test_diff_without_a_checkout_is_permanent(run: Run) -> None:
    failed = run.fails(git_diff, {"base": "main"}, ErrorClass.PERMANENT)
    assert "git_checkout_pr" in failed.error


def test_diff_does_not_read_a_repository_around_the_workspace(tmp_path: Path) -> None:
    git("init", "--quiet", cwd=tmp_path)
    workspace = tmp_path / "ws"
    (workspace / "repo").mkdir(parents=True)
    Run(workspace=workspace).fails(git_diff, {"base": "main"}, ErrorClass.PERMANENT)


# --- github_pr, github_status, github_comment -----------------------------------------


def test_read_a_pr(run: Run, gh: FakeGitHub, origin: Origin) -> None:
    done = run.ok(github_pr, {"repo": REPO, "number": 7})
    assert done.result["title"] == "Add a README"
    assert done.result["state"] == "open" and done.result["author"] == "ada"
    assert done.result["head"]["ref"] == "feature" and done.result["head"]["sha"] == origin.pr_sha
    assert done.result["base"]["ref"] == "main" and done.result["base"]["sha"] == origin.main_sha
    (request,) = gh.received("GET", f"/repos/{REPO}/pulls/7")
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Accept"] == "application/vnd.github+json"
    assert TOKEN not in request.path


def test_the_pr_read_then_checked_out_from_its_clone_url(run: Run, gh: FakeGitHub) -> None:
    pr = run.ok(github_pr, {"repo": REPO, "number": 7}).result
    done = run.ok(git_checkout_pr, {"repo_url": pr["head"]["clone_url"], "pr": 7})
    assert done.result["sha"] == pr["head"]["sha"]


def test_post_a_status_and_again_posts_nothing(run: Run, gh: FakeGitHub, origin: Origin) -> None:
    args = {"repo": REPO, "sha": origin.pr_sha, "state": "success", "description": "checked"}
    done = run.ok(github_status, args)
    assert done.result["already_set"] is False
    (posted,) = gh.received("POST", f"/repos/{REPO}/statuses/")
    assert posted.headers["Authorization"] == f"Bearer {TOKEN}"
    assert posted.body == {"state": "success", "context": "agentloop", "description": "checked"}
    assert run.ok(github_status, args).result["already_set"] is True
    assert len(gh.received("POST", f"/repos/{REPO}/statuses/")) == 1
    run.ok(github_status, {**args, "state": "failure"})
    assert [s["state"] for s in gh.statuses[(REPO, origin.pr_sha)]] == ["success", "failure"]


def test_post_a_comment_once_per_step(run: Run, gh: FakeGitHub) -> None:
    args = {"repo": REPO, "number": 7, "body": "Looks good: tests pass."}
    first = run.ok(github_comment, args)
    assert first.result["already_posted"] is False
    (posted,) = gh.received("POST", f"/repos/{REPO}/issues/7/comments")
    assert posted.headers["Authorization"] == f"Bearer {TOKEN}"
    assert posted.body["body"].startswith("Looks good: tests pass.")
    assert "<!-- agentloop:run-1:v1:p1 -->" in posted.body["body"]
    again = run.ok(github_comment, args)
    assert again.result == {**first.result, "already_posted": True}
    assert len(gh.comments[(REPO, 7)]) == 1
    run.key = "run-1:v2:p1"  # another step: another comment
    assert run.ok(github_comment, args).result["already_posted"] is False
    assert len(gh.comments[(REPO, 7)]) == 2


def test_a_comment_whose_post_failed_after_it_took_effect_is_not_posted_twice(
    run: Run, gh: FakeGitHub
) -> None:
    args = {"repo": REPO, "number": 7, "body": "Deployed."}
    gh.fail("POST", f"/repos/{REPO}/issues/7/comments", 502, apply=True)
    failed = run.fails(github_comment, args, ErrorClass.TRANSIENT)
    assert not failed.not_applied  # a POST's 5xx may have taken effect: it had
    assert run.ok(github_comment, args).result["already_posted"] is True
    assert len(gh.comments[(REPO, 7)]) == 1


@pytest.mark.parametrize(
    ("method", "status", "body", "headers", "error_class", "not_applied", "says"),
    [
        ("GET", 404, {"message": "Not Found"}, {}, ErrorClass.PERMANENT, False, "owner/repo"),
        ("GET", 403, {"message": "API rate limit exceeded"}, {"x-ratelimit-remaining": "0"},
         ErrorClass.TRANSIENT, True, "rate limited"),
        ("GET", 429, {"message": "slow down"}, {"retry-after": "7"}, ErrorClass.TRANSIENT,
         True, "retry-after/reset: 7"),
        ("GET", 500, {"message": "boom"}, {}, ErrorClass.TRANSIENT, False, "retry later"),
        ("POST", 503, {"message": "unavailable"}, {}, ErrorClass.TRANSIENT, False, "retry later"),
        ("POST", 429, {"message": "slow down"}, {}, ErrorClass.TRANSIENT, True, "rate limited"),
        ("POST", 422, {"message": "Validation Failed"}, {}, ErrorClass.PERMANENT, False,
         "Validation Failed"),
    ],
)  # fmt: skip
def test_api_errors_are_classified(
    run: Run,
    gh: FakeGitHub,
    origin: Origin,
    method: str,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str],
    error_class: ErrorClass,
    not_applied: bool,
    says: str,
) -> None:
    prefix = f"/repos/{REPO}/{'commits' if method == 'GET' else 'statuses'}/"
    gh.fail(method, prefix, status, body=body, headers=headers)
    args = {"repo": REPO, "sha": origin.pr_sha, "state": "pending"}
    failed = run.fails(github_status, args, error_class)
    assert failed.not_applied is not_applied
    assert says in failed.error


def test_a_refused_token_is_permanent_and_says_what_to_fix(
    run: Run, gh: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_expiredEXPIRED")
    failed = run.fails(github_pr, {"repo": REPO, "number": 7}, ErrorClass.PERMANENT)
    assert "401" in failed.error and "GITHUB_TOKEN" in failed.error
    assert "ghp_expiredEXPIRED" not in failed.error
    monkeypatch.delenv("GITHUB_TOKEN")
    failed = run.fails(github_pr, {"repo": REPO, "number": 7}, ErrorClass.PERMANENT)
    assert "set GITHUB_TOKEN" in failed.error


def test_a_forbidden_post_names_the_permission(run: Run, gh: FakeGitHub, origin: Origin) -> None:
    gh.forbidden.add(REPO)
    args = {"repo": REPO, "sha": origin.pr_sha, "state": "success"}
    failed = run.fails(github_status, args, ErrorClass.PERMANENT)
    assert "403" in failed.error and "commit statuses" in failed.error


def test_a_missing_pr_is_permanent(run: Run, gh: FakeGitHub) -> None:
    failed = run.fails(github_pr, {"repo": REPO, "number": 404}, ErrorClass.PERMANENT)
    assert "404" in failed.error


def test_an_api_that_refuses_connections_is_transient_not_applied(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    args = {"repo": REPO, "number": 7, "body": "hi"}
    assert run.fails(github_comment, args, ErrorClass.TRANSIENT).not_applied


@pytest.mark.parametrize(
    "args",
    [
        {"repo": "acme", "number": 7},
        {"repo": "acme/shop/extra", "number": 7},
        {"repo": "acme/..", "number": 7},
        {"repo": "acme/shop", "number": 0},
    ],
)
def test_github_pr_refuses_bad_arguments(run: Run, args: dict[str, Any]) -> None:
    run.fails(github_pr, args, ErrorClass.PERMANENT)


def test_modules_load_with_their_flags() -> None:
    registry = load_registry(["app.tools.git", "app.tools.github"])
    policies = registry.policies()
    assert set(policies) == {
        "git_checkout_pr", "git_diff", "github_pr", "github_comment", "github_status"
    }  # fmt: skip
    assert policies["github_comment"].requires_approval
    assert policies["github_status"].requires_approval
    assert not policies["git_checkout_pr"].requires_approval
    assert not policies["github_pr"].requires_approval
    assert all(p.idempotent for p in policies.values())


# --- a run through the service ------------------------------------------------------


def test_a_run_checks_out_diffs_reads_posts_a_status_and_comments_without_leaking_the_token(
    harness: Harness, gh: FakeGitHub, origin: Origin
) -> None:
    for item in (git_checkout_pr, git_diff, github_pr, github_status, github_comment):
        harness.service.tools.register(item)
    harness.planner.script = [
        PlanProduced(
            steps=[
                PlannedStep(
                    description="Check out PR #7",
                    tool="git_checkout_pr",
                    args={"repo_url": http_url(gh), "pr": 7},
                ),
                PlannedStep(description="Diff it", tool="git_diff", args={"base": "main"}),
                PlannedStep(
                    description="Read the PR", tool="github_pr", args={"repo": REPO, "number": 7}
                ),
                PlannedStep(
                    description="Mark the head commit checked",
                    tool="github_status",
                    args={
                        "repo": REPO,
                        "sha": "${steps.1.result.sha}",
                        "state": "success",
                        "description": "diffed by agentloop",
                    },
                ),
                PlannedStep(
                    description="Tell the author",
                    tool="github_comment",
                    args={
                        "repo": REPO,
                        "number": 7,
                        "body": "Checked ${steps.1.result.sha}: "
                        "${steps.2.result.files_changed} files changed.",
                    },
                ),
            ]
        )
    ]
    run_id = harness.service.create_run("check PR 7 of acme/shop and mark it")
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.PAUSED, view.events
    assert view.pending_approval is not None
    assert not gh.received("POST")
    harness.service.approve(run_id, by="reviewer")
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.PAUSED, [e.message for e in view.events]
    assert len(gh.received("POST")) == 1  # the status; the comment waits for its approval
    harness.service.approve(run_id, by="reviewer")
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED, [e.message for e in view.events]

    (posted,) = gh.received("POST", f"/repos/{REPO}/statuses/{origin.pr_sha}")
    assert posted.headers["Authorization"] == f"Bearer {TOKEN}"
    assert posted.body["state"] == "success"
    assert all(r.headers["Authorization"] == f"Basic {BASIC}" for r in gh.received("GET", "/git/"))
    (comment,) = gh.received("POST", f"/repos/{REPO}/issues/7/comments")
    assert comment.headers["Authorization"] == f"Bearer {TOKEN}"
    assert comment.body["body"].startswith(f"Checked {origin.pr_sha}: 2 files changed.")
    by_tool = {s.tool: s for s in view.steps}
    assert by_tool["git_diff"].result["files_changed"] == 2
    assert by_tool["github_pr"].result["title"] == "Add a README"

    seen = [repr(view), *(e.message for e in view.events), *(repr(e) for e in view.events)]
    seen += [repr(s.result) + repr(s.error) + repr(s.args) for s in view.steps]
    seen += [request.model_dump_json() for request in harness.planner.requests]
    assert harness.planner.requests
    # What is searched holds the tools' own words: a leak would be there.
    assert any("Add a README" in e.message for e in view.events)
    assert any("acme/shop#7" in r for r in seen[-len(harness.planner.requests) :])
    for text in seen:
        assert TOKEN not in text and BASIC not in text
