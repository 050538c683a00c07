"""Every page in a real browser at a phone's width (390 px) and a laptop's (1280 px):
no horizontal scroll, nothing pushed past the screen's edge or cut off by a box
that hides its overflow, the top bar's links all on screen, badges, column heads
and ages each on one line.

Screenshots of each page go to test-artifacts/; with AGENTLOOP_UPDATE_SCREENSHOTS=1
the README's (docs/screenshots/) are refreshed too.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.pages import Site, site  # noqa: F401 - a fixture
from tests.support.web import PASSWORD
from tests.test_browser import served, shoot  # noqa: F401 - a fixture, and the screenshot helper

pytestmark = pytest.mark.e2e

WIDTHS = {"phone": 390, "laptop": 1280}
# The README shows these; the others are saved as test artifacts only.
README_SHOTS = {
    "laptop-runs-list", "phone-runs-list", "phone-run-waiting", "phone-run-completed",
    "phone-approval",
}  # fmt: skip

# What overflows: elements past the viewport's right or left edge, and elements cut
# off by an ancestor that hides its overflow. Content inside a box that scrolls
# (a wide report table) is reachable, so it does not count.
MEASURE = """() => {
  const width = window.innerWidth;
  const classes = (el) => typeof el.className === "string" && el.className.trim()
    ? "." + el.className.trim().split(/\\s+/).join(".") : "";
  const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + classes(el);
  const problems = [];
  const shown = (el) => {  // not inside a visually hidden 1-px box (a stacked table's head)
    for (let up = el; up; up = up.parentElement) {
      if (up.getBoundingClientRect().width <= 1) return false;
    }
    return true;
  };
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 || box.height === 0 || !shown(el)) continue;
    let scrolls = false, parent = el.parentElement;
    while (parent && parent !== document.body) {
      const style = getComputedStyle(parent);
      if (style.overflowX === "auto" || style.overflowX === "scroll") { scrolls = true; break; }
      if (style.overflowX === "hidden" || style.overflowX === "clip") {
        const outer = parent.getBoundingClientRect();
        if (outer.width > 1 && (box.right > outer.right + 1 || box.left < outer.left - 1))
          problems.push(name(el) + " cut off by " + name(parent));
      }
      parent = parent.parentElement;
    }
    if (scrolls) continue;
    if (box.right > width + 1 || box.left < -1)
      problems.push(name(el) + " spans " + Math.round(box.left) + ".." + Math.round(box.right));
    const style = getComputedStyle(el);
    if (style.overflowX === "visible" && el.clientWidth > 1 && el.scrollWidth > el.clientWidth + 1)
      problems.push(name(el) + " overflows its box: " + el.scrollWidth + " > " + el.clientWidth);
  }
  // Short labels broken over lines ("complete|d", "Age 3 min|12 s|ago") read badly.
  const lines = (el) => {
    const range = document.createRange();
    range.selectNodeContents(el);
    return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
  };
  for (const label of document.querySelectorAll(".badge, table.runs th, table.runs time")) {
    if (shown(label) && lines(label) > 1) {
      problems.push(name(label) + " on " + lines(label) + " lines: " + label.textContent);
    }
  }
  return {scrollWidth: document.documentElement.scrollWidth, innerWidth: width, problems};
}"""

TOP_BAR = """() => {
  const width = window.innerWidth;
  const bar = document.querySelector("header.topbar").getBoundingClientRect();
  return [...document.querySelectorAll("header.topbar a, header.topbar button")].map((el) => {
    const box = el.getBoundingClientRect();
    return {text: el.textContent.trim(), left: box.left, right: box.right, top: box.top,
            bottom: box.bottom, inside: box.left >= 0 && box.right <= width &&
            box.top >= bar.top && box.bottom <= bar.bottom && box.width > 0};
  });
}"""


def check_page(page: Any, label: str, *, signed_in: bool) -> None:
    found = page.evaluate(MEASURE)
    assert found["scrollWidth"] <= found["innerWidth"], (label, found)
    assert found["problems"] == [], (label, found["problems"][:10])
    links = page.evaluate(TOP_BAR)
    assert all(link["inside"] for link in links), (label, links)
    texts = {link["text"] for link in links}
    if signed_in:
        assert {"Runs", "New run", "Users", "Sign out"} <= texts, (label, texts)
        assert page.locator("header.topbar >> text=Sign out").is_visible()


@pytest.mark.parametrize("device", WIDTHS)
def test_every_page_fits_the_screen(browser, site: Site, device: str):  # noqa: F811
    context = browser.new_context(viewport={"width": WIDTHS[device], "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(site.url + "/login")
    check_page(page, f"{device} login", signed_in=False)
    save(page, f"{device}-login")
    page.fill("#name", site.admin.name)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_selector("h1:has-text('Runs')")

    for name, path in site.pages.items():
        if name == "login":
            continue
        page.goto(site.url + path)
        page.wait_for_load_state("load")
        check_page(page, f"{device} {name}", signed_in=True)
        save(page, f"{device}-{name}")

    page.goto(site.url + site.approval_path())
    page.wait_for_selector("#approval")
    check_page(page, f"{device} approval", signed_in=True)
    save(page, f"{device}-approval")
    page.click("#approval button[data-action=approve]")
    page.wait_for_selector("#done")
    check_page(page, f"{device} approval done", signed_in=True)
    save(page, f"{device}-approval-done")
    # The error pages answer 404 and 400 on purpose; anything else (a CSP refusal, a
    # script error) is a problem.
    assert [p for p in problems if not p.startswith("Failed to load resource")] == [], problems
    context.close()


def save(page: Any, name: str) -> None:
    if name in README_SHOTS:
        shoot(page, name)
    else:
        from tests.test_browser import ARTIFACTS

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
