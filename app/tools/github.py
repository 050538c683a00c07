"""GitHub tools over the REST API: read a pull request, comment, set a commit status.

    github_pr       read a PR: title, state, author, head and base refs and shas. Idempotent.
    github_comment  post a comment on a PR or issue. Needs approval. Idempotent through a
                    marker: the body carries `<!-- agentloop:<step key> -->`, and a comment
                    with that marker already on the issue is returned instead of posting
                    again, so a retry after a dropped connection or a 5xx (whose effect
                    is unknown) or a crashed worker never posts twice.
    github_status   set a commit status. Needs approval. Idempotent: GitHub keeps the
                    latest status per (sha, context), so a repeat changes nothing; when
                    the newest status of that context already says the same, nothing is
                    posted at all.

GITHUB_TOKEN and GITHUB_API_URL (default https://api.github.com) are read when a tool
runs, from the worker's environment, else from the run's env. The token travels only in
an Authorization header (dropped on a redirect to another host), never in a URL, and is
scrubbed from every message and result.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.models import ErrorClass
from app.tools.git import github_api_url, github_token, scrub
from app.tools.registry import Tool, ToolContext, ToolError, ToolResult, tool

API_TIMEOUT = 30.0
GITHUB_TOOL_TIMEOUT = 120.0
MAX_BODY = 2 * 1024 * 1024  # a PR object is ~25 KB; a page of 100 comments can be ~1 MB
MAX_PAGES = 20  # of 100 comments searched for a marker
BODY_SHOWN = 4_000  # of a PR's description, in a result
API_VERSION = "2022-11-28"
REPO = r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$"


# --- the API client --------------------------------------------------------------------


@dataclass(frozen=True)
class ApiResponse:
    status: int
    headers: Message
    data: Any


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry the token to another host."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        old_host = urllib.parse.urlsplit(req.full_url).netloc
        if new is not None and urllib.parse.urlsplit(newurl).netloc != old_host:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_SameHostRedirects)


def github_call(
    ctx: ToolContext,
    method: Literal["GET", "POST"],
    path: str,
    *,
    body: Mapping[str, Any] | None = None,
    query: Mapping[str, str | int] | None = None,
    need: str,
) -> ApiResponse:
    """Call the GitHub API; 2xx is returned, everything else raised as a classified
    ToolError. `need` says what the token must allow (for a 403's message)."""
    token = github_token(ctx)
    url = github_api_url(ctx) + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    headers = {
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": API_VERSION,
        "User-Agent": "agentloop",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    target = f"{method} {path}"
    secrets = [token] if token else []
    try:
        with _OPENER.open(request, timeout=API_TIMEOUT) as response:
            raw = response.read(MAX_BODY + 1)
            status, answer_headers = response.status, response.headers
    except urllib.error.HTTPError as exc:
        with exc:
            raise _status_error(
                target, exc, has_token=bool(token), need=need, secrets=secrets
            ) from None
    except urllib.error.URLError as exc:
        never_sent = isinstance(exc.reason, ConnectionRefusedError | socket.gaierror)
        raise ToolError(
            scrub(f"{target}: cannot connect to {github_api_url(ctx)}: {exc.reason}", secrets),
            ErrorClass.TRANSIENT,
            not_applied=never_sent,
        ) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise ToolError(
            scrub(f"{target}: {type(exc).__name__}: {exc or 'timed out'}", secrets),
            ErrorClass.TRANSIENT,
        ) from None
    if len(raw) > MAX_BODY:
        raise ToolError(f"{target}: the answer is larger than {MAX_BODY} bytes")
    try:
        parsed = json.loads(raw) if raw.strip() else None
    except ValueError:
        raise ToolError(
            f"{target} answered {status} with a body that is not JSON: {raw[:200]!r}; "
            "is GITHUB_API_URL the API's address?"
        ) from None
    return ApiResponse(status=status, headers=answer_headers, data=parsed)


def _status_error(
    target: str, exc: urllib.error.HTTPError, *, has_token: bool, need: str, secrets: list[str]
) -> ToolError:
    raw = exc.read(2_000).decode(errors="replace")
    try:
        said = str(json.loads(raw).get("message", ""))
    except (ValueError, AttributeError):
        said = raw.strip()[:300]
    said = scrub(said, secrets)
    head = f"{target} answered {exc.code}" + (f": {said}" if said else "")
    code = exc.code
    rate_limited = code == 429 or (
        code == 403
        and ("rate limit" in said.lower() or exc.headers.get("x-ratelimit-remaining") == "0")
    )
    if rate_limited:
        wait = exc.headers.get("retry-after") or exc.headers.get("x-ratelimit-reset")
        hint = f" (retry-after/reset: {wait})" if wait else ""
        # GitHub refused the request before acting on it.
        return ToolError(f"{head}; rate limited, retry later{hint}", ErrorClass.TRANSIENT,
                         not_applied=True)  # fmt: skip
    if code == 401:
        fix = (
            "GitHub refused the token: set GITHUB_TOKEN in the worker's environment to a "
            "valid, unexpired token"
            if has_token
            else "GitHub needs a token here: set GITHUB_TOKEN in the worker's environment"
        )
        return ToolError(f"{head}; {fix}")
    if code == 403:
        return ToolError(
            f"{head}; the token may not do this: it needs {need} on this repository "
            "(a fine-grained token must include the repository; an organisation may "
            "require SSO authorisation of the token)"
        )
    if code == 404:
        return ToolError(
            f"{head}; check the owner/repo and number (GitHub also answers 404 for a private "
            "repository the token cannot see)"
        )
    if code >= 500:
        # The request may have taken effect before the server failed.
        return ToolError(f"{head}; GitHub failed, retry later", ErrorClass.TRANSIENT)
    return ToolError(head)


def _comments_pages(ctx: ToolContext, repo: str, number: int) -> Any:
    for page in range(1, MAX_PAGES + 1):
        answer = github_call(
            ctx,
            "GET",
            f"/repos/{repo}/issues/{number}/comments",
            query={"per_page": 100, "page": page},
            need="issues: read (or pull requests: read)",
        )
        items = answer.data if isinstance(answer.data, list) else []
        yield from items
        if len(items) < 100:
            return


# --- github_pr ---------------------------------------------------------------------------


class RepoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str = Field(pattern=REPO, description='The repository, "owner/name".')

    @field_validator("repo")
    @classmethod
    def _not_dots(cls, repo: str) -> str:
        if repo.split("/")[1] in (".", ".."):
            raise ValueError('must be "owner/name"')
        return repo


class PrArgs(RepoArgs):
    number: int = Field(gt=0, description="The pull request number.")


def _ref(side: Any) -> dict[str, Any]:
    side = side if isinstance(side, dict) else {}
    repo = side.get("repo")
    repo = repo if isinstance(repo, dict) else {}
    return {
        "ref": side.get("ref"),
        "sha": side.get("sha"),
        "repo": repo.get("full_name"),
        "clone_url": repo.get("clone_url"),
    }


@tool(
    name="github_pr",
    description=(
        "Read a GitHub pull request: {number, title, state (open/closed), merged, draft, "
        "author, head: {ref, sha, repo, clone_url}, base: {ref, sha, repo, clone_url}, "
        f"html_url, body (first {BODY_SHOWN} characters)}}. Use head.sha for github_status "
        "and head.clone_url with git_checkout_pr. 401/403/404 are permanent (the message "
        "says what to fix); 429 and 5xx are retried. Idempotent."
    ),
    args=PrArgs,
    idempotent=True,
    timeout=GITHUB_TOOL_TIMEOUT,
)
def github_pr(args: PrArgs, ctx: ToolContext) -> ToolResult:
    answer = github_call(
        ctx, "GET", f"/repos/{args.repo}/pulls/{args.number}", need="pull requests: read"
    )
    pr = answer.data if isinstance(answer.data, dict) else {}
    user = pr.get("user")
    user = user if isinstance(user, dict) else {}
    body = pr.get("body") or ""
    result = {
        "number": pr.get("number", args.number),
        "title": pr.get("title"),
        "state": pr.get("state"),
        "merged": bool(pr.get("merged")),
        "draft": bool(pr.get("draft")),
        "author": user.get("login"),
        "head": _ref(pr.get("head")),
        "base": _ref(pr.get("base")),
        "html_url": pr.get("html_url"),
        "body": body[:BODY_SHOWN] + ("\n[description truncated]" if len(body) > BODY_SHOWN else ""),
    }
    secrets = [t for t in [github_token(ctx)] if t]
    result = json.loads(scrub(json.dumps(result), secrets)) if secrets else result
    return ToolResult(
        result=result,
        summary=f"{args.repo}#{args.number} ({result['state']}): {result['title']} by "
        f"{result['author']}, {result['head']['ref']} → {result['base']['ref']}",
    )


# --- github_comment ---------------------------------------------------------------------


def comment_marker(ctx: ToolContext) -> str:
    return f"<!-- agentloop:{ctx.idempotency_key} -->"


class CommentArgs(PrArgs):
    number: int = Field(gt=0, description="The pull request or issue number.")
    body: str = Field(min_length=1, max_length=60_000, description="Markdown.")


@tool(
    name="github_comment",
    description=(
        "Post a comment (markdown) on a GitHub pull request or issue. Returns {id, html_url, "
        "already_posted}. Needs approval. Idempotent: the comment carries a hidden marker of "
        "this step, and when a comment with it is already there (an earlier attempt got "
        "through) it is returned instead of posting twice. 401/403/404 are permanent; 429 "
        "and 5xx are retried."
    ),
    args=CommentArgs,
    requires_approval=True,
    idempotent=True,
    timeout=GITHUB_TOOL_TIMEOUT,
    summarize=lambda a: f"comment on {a.get('repo')}#{a.get('number')}",
)
def github_comment(args: CommentArgs, ctx: ToolContext) -> ToolResult:
    marker = comment_marker(ctx)
    for comment in _comments_pages(ctx, args.repo, args.number):
        if isinstance(comment, dict) and marker in str(comment.get("body", "")):
            return ToolResult(
                result={
                    "id": comment.get("id"),
                    "html_url": comment.get("html_url"),
                    "already_posted": True,
                },
                summary=f"comment on {args.repo}#{args.number} was already posted "
                f"({comment.get('html_url')})",
            )
    answer = github_call(
        ctx,
        "POST",
        f"/repos/{args.repo}/issues/{args.number}/comments",
        body={"body": f"{args.body}\n\n{marker}"},
        need="issues: write (or pull requests: write)",
    )
    made = answer.data if isinstance(answer.data, dict) else {}
    return ToolResult(
        result={"id": made.get("id"), "html_url": made.get("html_url"), "already_posted": False},
        summary=f"commented on {args.repo}#{args.number} ({made.get('html_url')})",
    )


# --- github_status ----------------------------------------------------------------------


class StatusArgs(RepoArgs):
    sha: str = Field(pattern=r"^[0-9a-f]{40}$", description="The full commit sha.")
    state: Literal["pending", "success", "failure", "error"]
    context: str = Field(
        "agentloop", min_length=1, max_length=100, description="Which check this is."
    )
    description: str = Field("", max_length=140)
    target_url: str | None = Field(
        None, pattern=r"^https?://", max_length=2000, description="A link for details."
    )


@tool(
    name="github_status",
    description=(
        "Set a commit status on GitHub (the check shown on a PR): state pending, success, "
        "failure or error for a `context` (default agentloop) on a full commit sha. Returns "
        "{id, state, context, already_set}. Needs approval. Idempotent: the newest status "
        "per context is the one that counts, and when it already says the same nothing is "
        "posted. 401/403/404/422 are permanent; 429 and 5xx are retried."
    ),
    args=StatusArgs,
    requires_approval=True,
    idempotent=True,
    timeout=GITHUB_TOOL_TIMEOUT,
    summarize=lambda a: (
        f"set status {a.get('state')} ({a.get('context', 'agentloop')}) on "
        f"{a.get('repo')}@{str(a.get('sha'))[:12]}"
    ),
)
def github_status(args: StatusArgs, ctx: ToolContext) -> ToolResult:
    want = {
        "state": args.state,
        "context": args.context,
        "description": args.description,
        "target_url": args.target_url,
    }
    existing = github_call(
        ctx,
        "GET",
        f"/repos/{args.repo}/commits/{args.sha}/statuses",
        query={"per_page": 100},
        need="commit statuses: read",
    ).data
    # Newest first: the first of this context is the one GitHub shows.
    newest = next(
        (s for s in existing or [] if isinstance(s, dict) and s.get("context") == args.context),
        None,
    )
    if newest is not None and all((newest.get(k) or None) == (v or None) for k, v in want.items()):
        return ToolResult(
            result=_status_result(args, newest.get("id"), already_set=True),
            summary=f"status {args.context} on {args.sha[:12]} already {args.state}",
        )
    body = {k: v for k, v in want.items() if v}
    answer = github_call(
        ctx,
        "POST",
        f"/repos/{args.repo}/statuses/{args.sha}",
        body=body,
        need="commit statuses: write",
    )
    made = answer.data if isinstance(answer.data, dict) else {}
    return ToolResult(
        result=_status_result(args, made.get("id"), already_set=False),
        summary=f"set status {args.context}={args.state} on {args.repo}@{args.sha[:12]}",
    )


def _status_result(args: StatusArgs, status_id: Any, *, already_set: bool) -> dict[str, Any]:
    return {
        "id": status_id,
        "state": args.state,
        "context": args.context,
        "already_set": already_set,
    }


TOOLS: list[Tool] = [github_pr, github_comment, github_status]
