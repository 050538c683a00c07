"""Git tools: check out a pull request (or a branch) from a real remote, diff it.

    git_checkout_pr   fetch refs/pull/N/head (or refs/heads/B) into <workspace>/<path>
                      and check it out, detached, in a clean tree. Idempotent.
    git_diff          the checkout against a base ref (PR-style `base...HEAD` by default),
                      with per-file counts and a bounded patch. Idempotent.

Credentials: when the remote is on the GitHub server (GITHUB_SERVER_URL, else derived
from GITHUB_API_URL: api.github.com means https://github.com) and GITHUB_TOKEN is set
(in the worker's environment, else in the run's env), the token travels as an
`http.extraHeader` handed to that one git command through GIT_CONFIG_COUNT/KEY/VALUE
environment variables: never in argv (which an error message may quote), never in the
remote URL stored in .git/config, never sent to any other host. Whatever git prints
is scrubbed of the token before it reaches a result or an error.

Only the file, http(s), ssh and git transports are allowed (GIT_ALLOW_PROTOCOL), so a
planner cannot reach git's `ext::` helper, which runs commands.
"""

from __future__ import annotations

import base64
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.engine.models import ErrorClass
from app.engine.redact import MASK
from app.tools.builtin import OUTPUT_LIMIT, ProcessOutput, resolve_inside, run_process, safe_env
from app.tools.registry import Tool, ToolContext, ToolError, ToolResult, tool

GIT_TOOL_TIMEOUT = 300.0
GIT_COMMAND_TIMEOUT = 240.0  # one git command; below the tool's timeout, so git is killed here
DEFAULT_API_URL = "https://api.github.com"
ALLOWED_PROTOCOLS = "file:http:https:ssh:git"
# A branch or ref name as git accepts it, conservatively (see check_ref_name).
REF_NAME = r"^[A-Za-z0-9._/@+-]{1,200}$"
SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/\\].*$")  # git@github.com:o/r.git

# What git prints, and what it means for the caller.
MISSING_REF = re.compile(r"couldn't find remote ref|no such remote ref|invalid refspec", re.I)
AUTH_FAILED = re.compile(
    r"authentication failed|could not read (username|password)|terminal prompts disabled|"
    r"returned error: 40[13]|permission denied \(publickey|invalid username or password",
    re.I,
)
NOT_FOUND = re.compile(
    r"repository not found|does not appear to be a git repository|returned error: 404|"
    r"not a git repository",
    re.I,
)
NEVER_CONNECTED = re.compile(
    r"could not resolve host|connection refused|couldn't connect to server|"
    r"failed to connect|name or service not known|network is unreachable",
    re.I,
)
FLAKY_NETWORK = re.compile(
    r"timed out|early eof|remote end hung up|connection reset|returned error: (429|5\d\d)|"
    r"rpc failed|unexpected disconnect|gnutls|ssl",
    re.I,
)


# --- environment and credentials ----------------------------------------------------


def github_token(ctx: ToolContext) -> str:
    """GITHUB_TOKEN from the worker's environment (read now), else from the run's env."""
    return os.environ.get("GITHUB_TOKEN") or ctx.env.get("GITHUB_TOKEN", "")


def github_api_url(ctx: ToolContext) -> str:
    url = os.environ.get("GITHUB_API_URL") or ctx.env.get("GITHUB_API_URL") or DEFAULT_API_URL
    return url.rstrip("/")


def github_server_url(ctx: ToolContext) -> str:
    """The origin git remotes on GitHub live at: https://github.com for the public API,
    else the API's own scheme and host (GitHub Enterprise, a test's loopback fake)."""
    configured = os.environ.get("GITHUB_SERVER_URL") or ctx.env.get("GITHUB_SERVER_URL")
    if configured:
        return _origin(configured)
    api = urllib.parse.urlsplit(github_api_url(ctx))
    if api.hostname == "api.github.com":
        return "https://github.com"
    return f"{api.scheme}://{api.netloc}".lower()


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every secret (and its base64 header form) replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def _basic_header(token: str) -> str:
    encoded = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    return f"Authorization: Basic {encoded}"


def _credentials(ctx: ToolContext, url: str | None) -> tuple[dict[str, str], list[str]]:
    """(git env vars, secrets to scrub) for talking to `url`: the token only for the
    GitHub server, over http(s), through the environment of this one command."""
    token = github_token(ctx)
    if not token:
        return {}, []
    header = _basic_header(token)
    secrets = [header.split(" ", 2)[2], token]
    if url is None or not url.lower().startswith(("https://", "http://")):
        return {}, secrets
    if _origin(url) != github_server_url(ctx):
        return {}, secrets
    env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader"}
    env["GIT_CONFIG_VALUE_0"] = header
    return env, secrets


class Git:
    """Runs git for one tool call: no prompts, allowed transports only, no repository
    above the workspace, the token (if any) for the GitHub server only, output scrubbed."""

    def __init__(self, ctx: ToolContext, *, url: str | None = None) -> None:
        creds, self.secrets = _credentials(ctx, url)
        run_env = {k: v for k, v in ctx.env.items() if k != "GITHUB_TOKEN"}
        self.env = safe_env(
            {
                **run_env,
                "LC_ALL": "C",  # messages in English: they are classified below
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_ASKPASS": "",
                "SSH_ASKPASS": "",
                "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
                "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS,
                "GIT_CEILING_DIRECTORIES": str(ctx.workspace.resolve()),
                "GIT_CONFIG_NOSYSTEM": "1",
                **creds,
            }
        )

    def run(self, *argv: str, cwd: Path) -> ProcessOutput:
        try:
            out = run_process(["git", *argv], cwd=cwd, env=self.env, timeout=GIT_COMMAND_TIMEOUT)
        except ToolError as exc:
            raise ToolError(
                scrub(str(exc), self.secrets), exc.error_class, not_applied=exc.not_applied
            ) from None
        return ProcessOutput(
            exit_code=out.exit_code,
            output=scrub(out.output, self.secrets),
            truncated=out.truncated,
            bytes=out.bytes,
        )

    def check(self, *argv: str, cwd: Path) -> str:
        """Run git; a non-zero exit is a permanent failure quoting git's output."""
        out = self.run(*argv, cwd=cwd)
        if out.exit_code != 0:
            raise ToolError(f"`git {argv[0]}` failed ({out.exit_code}): {out.tail().strip()}")
        return out.output

    def fetch(self, url: str, refspec: str, *, cwd: Path, what: str) -> None:
        out = self.run("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "origin",
                       refspec, cwd=cwd)  # fmt: skip
        if out.exit_code != 0:
            raise fetch_error(out.tail().strip(), url=url, what=what)


def fetch_error(output: str, *, url: str, what: str) -> ToolError:
    """A failed `git fetch`, classified from what git printed."""
    shown = f"git fetch of {what} from {url} failed: {output}"
    if MISSING_REF.search(output):
        return ToolError(f"{what} does not exist on {url} (check the number or name): {output}")
    if AUTH_FAILED.search(output):
        return ToolError(
            f"{shown}\nThe remote refused the credentials: set GITHUB_TOKEN in the worker's "
            "environment to a token that can read this repository (contents: read), or "
            "check the URL."
        )
    if NOT_FOUND.search(output):
        return ToolError(f"{shown}\nNo repository at that URL (or the token cannot see it).")
    if NEVER_CONNECTED.search(output):
        return ToolError(shown, ErrorClass.TRANSIENT, not_applied=True)
    if FLAKY_NETWORK.search(output):
        return ToolError(shown, ErrorClass.TRANSIENT)
    return ToolError(shown)


# --- arguments ------------------------------------------------------------------------


def check_ref_name(name: str) -> str:
    """No leading '-' (an option), no '..' or '//', no trailing '.' or '/'."""
    if name.startswith("-") or ".." in name or "//" in name or name.endswith((".", "/")):
        raise ValueError("is not a valid branch or ref name")
    return name


RefName = Annotated[str, Field(pattern=REF_NAME), AfterValidator(check_ref_name)]


def check_remote_url(url: str) -> str:
    url = url.strip()
    if not url or url.startswith("-"):
        raise ValueError("must be a repository URL")
    if SCP_LIKE.match(url):  # git@host:owner/repo.git
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https", "ssh", "git", "file"):
        if parts.password is not None or (parts.scheme.startswith("http") and parts.username):
            raise ValueError(
                "must not carry credentials (they would be stored and shown); set "
                "GITHUB_TOKEN in the worker's environment instead"
            )
        if parts.scheme != "file" and not parts.hostname:
            raise ValueError("needs a host")
        return url
    if url.startswith("/"):  # a local path (a bare repository on this machine)
        return url
    raise ValueError(
        "must be an https://, http://, ssh://, git://, file:// URL, user@host:path or an "
        "absolute path"
    )


class CheckoutArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_url: str = Field(
        max_length=2000,
        description="The remote, e.g. https://github.com/owner/repo.git (no credentials in "
        "it: GITHUB_TOKEN is used for the GitHub server).",
    )
    pr: int | None = Field(None, gt=0, description="Pull request number: fetches refs/pull/N/head.")
    branch: RefName | None = Field(None, description="A branch to check out instead of a PR.")
    path: str = Field(
        "repo", min_length=1, max_length=200, description="Directory in the workspace."
    )

    @field_validator("repo_url")
    @classmethod
    def _remote(cls, url: str) -> str:
        return check_remote_url(url)

    @model_validator(mode="after")
    def _one_target(self) -> CheckoutArgs:
        if (self.pr is None) == (self.branch is None):
            raise ValueError("give exactly one of pr or branch")
        return self


def _checkout_dir(ctx: ToolContext, path: str) -> Path:
    dest = resolve_inside(ctx.workspace, path)
    if dest == ctx.workspace.resolve():
        raise ToolError("path must be a directory inside the workspace, not the workspace itself")
    return dest


def _head(git: Git, cwd: Path, rev: str = "HEAD") -> dict[str, str]:
    fields = git.check("log", "-1", "--format=%H%x00%s%x00%an <%ae>%x00%cI", rev, "--", cwd=cwd)
    sha, subject, author, date = ([*fields.strip().split("\x00"), "", "", "", ""])[:4]
    return {"sha": sha, "subject": subject, "author": author, "date": date}


@tool(
    name="git_checkout_pr",
    description=(
        "Fetch a pull request (refs/pull/N/head) or a branch from a git remote into "
        "<workspace>/<path> (default repo/) and check it out, detached, in a clean tree "
        "(untracked and ignored files removed). Returns {path, ref, sha, subject, author, "
        "date}. On the GitHub server GITHUB_TOKEN is used for private repositories. A PR "
        "or branch that does not exist, a refused token or a missing repository is a "
        "permanent failure; an unreachable server is transient. Idempotent: the same call "
        "again gives the same checkout."
    ),
    args=CheckoutArgs,
    idempotent=True,
    timeout=GIT_TOOL_TIMEOUT,
    summarize=lambda a: (
        f"check out {'PR #' + str(a.get('pr')) if a.get('pr') else a.get('branch')}"
        f" of {a.get('repo_url')}"
    ),
)
def git_checkout_pr(args: CheckoutArgs, ctx: ToolContext) -> ToolResult:
    dest = _checkout_dir(ctx, args.path)
    git = Git(ctx, url=args.repo_url)
    if not (dest / ".git").is_dir():
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ToolError(f"{args.path} exists in the workspace and is not a git checkout")
        dest.mkdir(parents=True, exist_ok=True)
        git.check("init", "--quiet", cwd=dest)
    current = git.run("config", "--get", "remote.origin.url", cwd=dest)
    if current.exit_code != 0:
        git.check("remote", "add", "origin", args.repo_url, cwd=dest)
    elif current.output.strip() != args.repo_url:
        git.check("remote", "set-url", "origin", args.repo_url, cwd=dest)
    if args.pr is not None:
        ref, local, what = (
            f"refs/pull/{args.pr}/head",
            f"refs/remotes/origin/pr/{args.pr}",
            (f"PR #{args.pr} (refs/pull/{args.pr}/head)"),
        )
    else:
        ref, local = f"refs/heads/{args.branch}", f"refs/remotes/origin/{args.branch}"
        what = f"branch {args.branch!r}"
    git.fetch(args.repo_url, f"+{ref}:{local}", cwd=dest, what=what)
    git.check("-c", "advice.detachedHead=false", "checkout", "--quiet", "--force", "--detach",
              local, "--", cwd=dest)  # fmt: skip
    git.check("clean", "-q", "-ffdx", cwd=dest)
    head = _head(git, dest)
    relative = dest.relative_to(ctx.workspace.resolve()).as_posix()
    result: dict[str, Any] = {"path": relative, "ref": ref, **head}
    return ToolResult(
        result=result,
        summary=f"checked out {what} at {head['sha'][:12]} into {relative}/: {head['subject']}",
    )


# --- git_diff -----------------------------------------------------------------------------


MAX_FILES_LISTED = 300


class DiffArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: RefName = Field(
        description="What to compare against: a branch of origin (e.g. main, fetched when "
        "missing), a tag or a commit sha.",
    )
    path: str = Field("repo", min_length=1, max_length=200, description="The checkout.")
    merge_base: bool = Field(
        True,
        description="true: changes since the branches diverged (base...HEAD, what a PR "
        "shows); false: the two trees compared directly (base HEAD).",
    )
    paths: list[str] = Field(
        default_factory=list, max_length=50, description="Only these paths (pathspecs)."
    )

    @field_validator("paths")
    @classmethod
    def _no_options(cls, paths: list[str]) -> list[str]:
        if any(not p or p.startswith("-") for p in paths):
            raise ValueError("paths must be non-empty and must not start with '-'")
        return paths


def _resolve_base(git: Git, cwd: Path, base: str) -> str:
    """The commit `base` names: origin's branch already fetched, a local ref or sha, or
    origin's branch fetched now."""
    for candidate in (f"refs/remotes/origin/{base}", base):
        found = git.run("rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}", cwd=cwd)
        if found.exit_code == 0:
            return found.output.strip()
    url = git.run("config", "--get", "remote.origin.url", cwd=cwd).output.strip() or "origin"
    git.fetch(url, f"+refs/heads/{base}:refs/remotes/origin/{base}", cwd=cwd,
              what=f"base {base!r}")  # fmt: skip
    return git.check("rev-parse", "--verify", f"refs/remotes/origin/{base}^{{commit}}",
                     cwd=cwd).strip()  # fmt: skip


def _numstat(output: str) -> list[dict[str, Any]]:
    files = []
    for line in output.splitlines():
        added, deleted, name = ([*line.split("\t", 2), "", ""])[:3]
        if not name:
            continue
        binary = added == "-"
        files.append(
            {
                "path": name,
                "added": None if binary else int(added),
                "deleted": None if binary else int(deleted),
                "binary": binary,
            }
        )
    return files


@tool(
    name="git_diff",
    description=(
        "The diff of a checkout (default repo/, made by git_checkout_pr) against a base: "
        "by default base...HEAD, the changes a pull request brings. Returns {base, base_sha, "
        "head_sha, files: [{path, added, deleted, binary}], insertions, deletions, diff, "
        f"truncated, bytes}}; the patch text keeps only its first and last "
        f"{OUTPUT_LIMIT // 2048} KB. A base that does not exist is a permanent failure. Idempotent."
    ),
    args=DiffArgs,
    idempotent=True,
    timeout=GIT_TOOL_TIMEOUT,
)
def git_diff(args: DiffArgs, ctx: ToolContext) -> ToolResult:
    dest = _checkout_dir(ctx, args.path)
    if not (dest / ".git").is_dir():
        raise ToolError(f"{args.path} is not a git checkout; run git_checkout_pr first")
    url = Git(ctx).run("config", "--get", "remote.origin.url", cwd=dest).output.strip()
    git = Git(ctx, url=url or None)
    base_sha = _resolve_base(git, dest, args.base)
    head_sha = git.check("rev-parse", "--verify", "HEAD^{commit}", cwd=dest).strip()
    if args.merge_base:
        found = git.run("merge-base", base_sha, head_sha, cwd=dest)
        if found.exit_code != 0:
            raise ToolError(f"{args.base} and HEAD have no common ancestor; use merge_base=false")
        since = found.output.strip()
    else:
        since = base_sha
    spec = ["--", *args.paths]
    numstat = git.check("diff", "--no-color", "--no-ext-diff", "--numstat", since, head_sha,
                        *spec, cwd=dest)  # fmt: skip
    files = _numstat(numstat)
    patch = git.run("diff", "--no-color", "--no-ext-diff", since, head_sha, *spec, cwd=dest)
    if patch.exit_code != 0:
        raise ToolError(f"`git diff` failed ({patch.exit_code}): {patch.tail().strip()}")
    insertions = sum(f["added"] or 0 for f in files)
    deletions = sum(f["deleted"] or 0 for f in files)
    result: dict[str, Any] = {
        "base": args.base,
        "base_sha": base_sha,
        "merge_base": since,
        "head_sha": head_sha,
        "files_changed": len(files),
        "files": files[:MAX_FILES_LISTED],
        "insertions": insertions,
        "deletions": deletions,
        "diff": patch.output,
        "truncated": patch.truncated,
        "bytes": patch.bytes,
    }
    if len(files) > MAX_FILES_LISTED:
        result["files_note"] = f"only the first {MAX_FILES_LISTED} of {len(files)} files listed"
    note = ", patch truncated" if patch.truncated else ""
    return ToolResult(
        result=result,
        summary=f"{len(files)} files changed, +{insertions} -{deletions} against "
        f"{args.base} ({since[:12]}){note}",
    )


TOOLS: list[Tool] = [git_checkout_pr, git_diff]
