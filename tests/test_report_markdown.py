"""The run report is Markdown written by a model from what tools returned: the run
page and the completion email show it rendered, by one function
(app/markdown_html.py), with anything hostile in it neutralised."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from flask.testing import FlaskClient

from app.engine.actions import PlanFinished
from app.engine.models import RunStatus
from app.markdown_html import markdown_html
from app.notify.compose import Links, run_mail
from app.service import Notice
from tests.support.fixtures import Harness, steps

REPORT = """# Deploy report

Deployed **shop 1.1.0** to `staging`; see [the build](https://ci.example.com/b/7).

| check | result |
|---|---|
| tests | 11 passed |

- one
- two
"""

HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    '<iframe src="https://evil.example"></iframe>',
    '<a href="javascript:alert(1)">click</a>',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click](jav&#x61;script:alert(1))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[click][ref]\n\n[ref]: javascript:alert(1)",
    "<javascript:alert(1)>",
    "![x](javascript:alert(1))",
    '<div style="position:fixed" onclick="alert(1)">x</div>',
    "<svg onload=alert(1)>",
    "```\n</pre><script>alert(1)</script>\n```",
]


class Tags(HTMLParser):
    """Every element and attribute a browser would see in an HTML fragment."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def assert_harmless(html: str, *, own_markup: bool = False) -> None:
    """No element, attribute or link that could run script or restyle the page
    (`own_markup`: an email's own layout may use div and style)."""
    forbidden = {"script", "iframe", "img", "svg", "object", "embed", "form"}
    for tag, attrs in Tags(html).found:
        assert tag not in forbidden and (own_markup or tag not in {"div", "style"}), html
        assert not any(name.startswith("on") for name in attrs), html
        assert own_markup or "style" not in attrs, html
        href = (attrs.get("href") or "").strip().lower()
        assert not href or href.startswith(("http://", "https://", "mailto:")), href


def test_markdown_is_rendered():
    html = markdown_html(REPORT)
    assert "<h1>Deploy report</h1>" in html
    assert "<strong>shop 1.1.0</strong>" in html and "<code>staging</code>" in html
    assert '<a href="https://ci.example.com/b/7" rel="noopener noreferrer nofollow">' in html
    assert "<table>" in html and "<td>11 passed</td>" in html
    assert "<li>one</li>" in html


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_markdown_is_neutralised(hostile: str):
    html = markdown_html(f"before\n\n{hostile}\n\nafter")
    assert_harmless(html)
    assert "before" in html and "after" in html  # the rest of the report survives


def test_raw_html_shows_as_text_not_markup():
    html = markdown_html("<b>bold?</b> <script>alert(1)</script>")
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def finished_run(harness: Harness, report: str) -> str:
    harness.planner.script = [steps("noop"), PlanFinished(report=report)]
    run_id = harness.service.create_run("report something", created_by="tests")
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED
    return run_id


def report_block(page: str) -> str:
    found = re.search(r'<div class="report markdown">(.*?)</div>', page, re.S)
    assert found, "no rendered report on the page"
    return found.group(1)


def test_the_run_page_and_the_email_render_the_report_alike(
    signed_in: FlaskClient, harness: Harness
):
    hostile = REPORT + "\n\n" + "\n\n".join(HOSTILE)
    run_id = finished_run(harness, hostile)
    page = signed_in.get(f"/runs/{run_id}").text
    shown = report_block(page)
    assert shown == str(markdown_html(hostile))
    assert "<h1>Deploy report</h1>" in shown and "<pre" not in page.split("Report", 1)[1][:40]
    assert_harmless(shown)

    view = harness.service.status(run_id)
    mail = run_mail(Notice.COMPLETED, view, Links(run=f"http://example.com/runs/{run_id}"))
    assert str(markdown_html(hostile)) in mail.html
    assert_harmless(mail.html, own_markup=True)
    assert "# Deploy report" in mail.text  # plain text keeps the Markdown as written
