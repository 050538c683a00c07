"""Markdown as safe HTML: the run report on the run page and in emails.

markdown-it-py renders CommonMark (plus tables and strikethrough) with raw HTML
turned off, so any tag in the text comes out as text; nh3 (ammonia) then keeps
only the tags and attributes Markdown produces and only http, https and mailto
links. Two layers, because a report is written by a model from what tools
returned: anything in it may be hostile.
"""

from __future__ import annotations

from functools import cache

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "s", "code", "pre",
    "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
# No style attributes: the pages' Content-Security-Policy refuses inline styles.
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}


@cache
def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def markdown_html(text: str) -> Markup:
    """`text` as sanitized HTML, safe to insert into a page or an email as is."""
    rendered = _parser().render(text or "")
    clean = nh3.clean(
        rendered,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
    )
    return Markup(clean)  # sanitized by nh3 just above
