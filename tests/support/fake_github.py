"""A loopback stand-in for the GitHub REST API (and git's dumb HTTP transport).

    with FakeGitHub(token="ghp_…") as gh:
        gh.add_pr("acme/shop", 7, head_ref="feature", head_sha=…, base_ref="main", …)
        os.environ["GITHUB_API_URL"] = gh.url

Serves GET /repos/{o}/{r}/pulls/{n}, GET+POST /repos/{o}/{r}/issues/{n}/comments,
GET /repos/{o}/{r}/commits/{sha}/statuses, POST /repos/{o}/{r}/statuses/{sha}, and
GET /git/<name>/... as static files from `git_root` (a bare repository after
`git update-server-info` is fetchable over dumb HTTP). Every request is recorded with
its headers. With `token` set, a request without `Authorization: Bearer <token>` (or,
for git, Basic x-access-token:<token>) is answered 401. `fail(method, path_prefix,
status, ...)` queues answers to give instead of the real one, in order.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGitHub:
    token: str | None = None
    git_root: Path | None = None
    requests: list[Recorded] = field(default_factory=list)
    prs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    comments: dict[tuple[str, int], list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    statuses: dict[tuple[str, str], list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    failures: list[tuple[str, str, int, dict[str, Any], dict[str, str], bool]] = field(
        default_factory=list
    )
    forbidden: set[str] = field(default_factory=set)
    _server: ThreadingHTTPServer | None = None
    _ids: int = 1000

    # --- set-up ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_pr(
        self,
        repo: str,
        number: int,
        *,
        title: str,
        head_ref: str,
        head_sha: str,
        base_ref: str,
        base_sha: str,
        user: str = "octocat",
        state: str = "open",
        body: str = "",
    ) -> None:
        def side(ref: str, sha: str) -> dict[str, Any]:
            return {
                "ref": ref,
                "sha": sha,
                "repo": {"full_name": repo, "clone_url": f"{self.url}/git/{repo}.git"},
            }

        self.prs[(repo, number)] = {
            "number": number,
            "title": title,
            "state": state,
            "merged": False,
            "draft": False,
            "user": {"login": user},
            "head": side(head_ref, head_sha),
            "base": side(base_ref, base_sha),
            "html_url": f"https://github.example/{repo}/pull/{number}",
            "body": body,
            # What makes a real PR answer large.
            "_links": {"padding": "x" * 20_000},
        }

    def fail(
        self,
        method: str,
        path_prefix: str,
        status: int,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        apply: bool = False,
    ) -> None:
        """Answer the next matching request with `status`; with apply=True the request
        takes effect first (a server failing after it acted)."""
        self.failures.append(
            (method, path_prefix, status, body or {"message": "fake failure"}, headers or {}, apply)
        )

    def received(self, method: str, path_prefix: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    # --- lifetime -------------------------------------------------------------------

    def __enter__(self) -> FakeGitHub:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # --- answering ------------------------------------------------------------------

    def _authorised(self, auth: str, *, git: bool) -> bool:
        if self.token is None:
            return True
        if auth == f"Bearer {self.token}":
            return True
        if git and auth.startswith("Basic "):
            return base64.b64decode(auth[6:]).decode() == f"x-access-token:{self.token}"
        return False

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.requests.append(
            Recorded(method, parts.path, parse_qs(parts.query), dict(h.headers.items()), body)
        )
        is_git = parts.path.startswith("/git/")
        if not self._authorised(h.headers.get("Authorization", ""), git=is_git):
            extra = {"WWW-Authenticate": 'Basic realm="GitHub"'} if is_git else {}
            return self._send(h, 401, {"message": "Bad credentials"}, extra)
        for i, (m, prefix, status, fbody, fheaders, apply) in enumerate(self.failures):
            if m == method and parts.path.startswith(prefix):
                del self.failures[i]
                if apply:
                    self._route(method, parts.path, body)
                return self._send(h, status, fbody, fheaders)
        if is_git:
            return self._git_file(h, parts.path)
        status, answer = self._route(method, parts.path, body)
        self._send(h, status, answer)

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)/(.+)", path)
        if not m:
            return 404, {"message": "Not Found"}
        repo, rest = m.groups()
        if repo in self.forbidden:
            return 403, {"message": "Resource not accessible by personal access token"}
        if (pr := re.fullmatch(r"pulls/(\d+)", rest)) and method == "GET":
            found = self.prs.get((repo, int(pr.group(1))))
            return (200, found) if found else (404, {"message": "Not Found"})
        if issue := re.fullmatch(r"issues/(\d+)/comments", rest):
            key = (repo, int(issue.group(1)))
            if key not in self.prs:
                return 404, {"message": "Not Found"}
            if method == "GET":
                return 200, self.comments[key]
            self._ids += 1
            made = {
                "id": self._ids,
                "body": body["body"],
                "html_url": f"https://github.example/{repo}/pull/{key[1]}#c{self._ids}",
            }
            self.comments[key].append(made)
            return 201, made
        if (st := re.fullmatch(r"commits/([0-9a-f]{40})/statuses", rest)) and method == "GET":
            return 200, list(reversed(self.statuses[(repo, st.group(1))]))
        if (st := re.fullmatch(r"statuses/([0-9a-f]{40})", rest)) and method == "POST":
            if body.get("state") not in ("pending", "success", "failure", "error"):
                return 422, {"message": "Validation Failed"}
            self._ids += 1
            made = {"id": self._ids, "url": "", **body}
            made.setdefault("description", None)
            made.setdefault("target_url", None)
            self.statuses[(repo, st.group(1))].append(made)
            return 201, made
        return 404, {"message": "Not Found"}

    def _git_file(self, h: BaseHTTPRequestHandler, path: str) -> None:
        if self.git_root is None:
            return self._send(h, 404, {"message": "Not Found"})
        target = (self.git_root / path.removeprefix("/git/")).resolve()
        if not target.is_relative_to(self.git_root.resolve()) or not target.is_file():
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = target.read_bytes()
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)
