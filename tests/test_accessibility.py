"""axe-core (the npm package, pinned and installed by scripts/ensure-browser.sh
into .agentloop/node) injected by Playwright into every page, at a phone's width
and a laptop's: zero serious or critical violations.

With CI=true a missing axe-core fails the test instead of skipping it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.support.fixtures import require
from tests.support.pages import Site, site  # noqa: F401 - a fixture
from tests.support.web import PASSWORD
from tests.test_browser import served  # noqa: F401 - a fixture

pytestmark = pytest.mark.e2e

AXE = ROOT / ".agentloop" / "node" / "node_modules" / "axe-core" / "axe.min.js"
SERIOUS = {"serious", "critical"}
RUN_AXE = """async () => {
  const results = await axe.run(document, {resultTypes: ["violations"]});
  return results.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.slice(0, 5).map((n) => n.target.join(" ") + ": " + n.failureSummary),
  }));
}"""


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE.exists():
        require("axe-core", FileNotFoundError(f"{AXE} (run scripts/ensure-browser.sh)"))
    return AXE.read_text()


def audit(page: Any, axe: str, label: str) -> list[str]:
    """The serious and critical violations on the page as it is now."""
    page.add_script_tag(content=axe)
    found = page.evaluate(RUN_AXE)
    return [f"{label}: {v['id']} ({v['impact']}) {v['help']} — {v['nodes']}"
            for v in found if v["impact"] in SERIOUS]  # fmt: skip


@pytest.mark.parametrize("width", [390, 1280])
def test_every_page_has_no_serious_accessibility_violation(
    browser,
    site: Site,  # noqa: F811
    axe_source: str,
    width: int,
):
    # axe is injected as a script the page did not serve: only the test's own
    # browser context lets it past the Content-Security-Policy.
    context = browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
    page = context.new_page()
    problems: list[str] = []

    page.goto(site.url + "/login")
    problems += audit(page, axe_source, "login")
    page.fill("#name", site.admin.name)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_selector("h1:has-text('Runs')")
    for name, path in site.pages.items():
        if name != "login":
            page.goto(site.url + path)
            problems += audit(page, axe_source, name)

    page.goto(site.url + site.approval_path())
    problems += audit(page, axe_source, "approval")
    page.click("#approval button[data-action=approve]")
    page.wait_for_selector("#done")
    problems += audit(page, axe_source, "approval done")
    context.close()
    assert problems == [], "\n".join(problems)


def test_axe_is_the_pinned_version():
    """The version ensure-browser.sh pins is the one the test runs."""
    script = (ROOT / "scripts" / "ensure-browser.sh").read_text()
    pinned = script.split("AXE_VERSION=", 1)[1].split()[0]
    package = AXE.parent / "package.json"
    if not package.exists():
        require("axe-core", FileNotFoundError(f"{package} (run scripts/ensure-browser.sh)"))
    assert f'"version": "{pinned}"' in Path(package).read_text()
