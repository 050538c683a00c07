"""Run the shop's tests against a deployed copy (the directory this file is in).

Exit codes: 0 all tests passed; 1 a test failed; 2 this is not a deployment
(no DEPLOY_MANIFEST.json); 75 (EX_TEMPFAIL) the fixture cache was cold and
has just been warmed — run again.

The fixture cache (.cache/fixtures.json) is a snapshot of the deployed
catalog plus sample carts, keyed to the artifact's sha256, so every fresh
deploy starts cold. Warming it is real work; stopping after it with exit 75
is deliberate: it is the transient failure agentloop's demo retries with
backoff. Each real test run is recorded in the staging database named by the
manifest's database_url (SQLite URLs only) and written to TEST_RESULTS.json.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import sys
import unittest
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "DEPLOY_MANIFEST.json"
CACHE = HERE / ".cache" / "fixtures.json"
RESULTS = HERE / "TEST_RESULTS.json"
EX_TEMPFAIL = 75
SAMPLE_CARTS = (
    [["apple", 3], ["bread", 1]],
    [["coffee", 2], ["milk", 4]],
    [["apple", 1], ["bread", 2], ["coffee", 1], ["milk", 1]],
)


def cache_is_warm(manifest: dict[str, str]) -> bool:
    if not CACHE.is_file():
        return False
    return json.loads(CACHE.read_text()).get("artifact_sha256") == manifest["artifact_sha256"]


def warm_cache(manifest: dict[str, str]) -> None:
    """Snapshot the deployed catalog and price the sample carts independently of shop.pricing."""
    from shop.catalog import CATALOG

    prices = {sku: item.price_cents for sku, item in CATALOG.items()}
    carts = [
        {"lines": lines, "expected_cents": sum(prices[sku] * qty for sku, qty in lines)}
        for lines in SAMPLE_CARTS
    ]
    CACHE.parent.mkdir(exist_ok=True)
    fixtures = {"artifact_sha256": manifest["artifact_sha256"], "catalog": prices, "carts": carts}
    CACHE.write_text(json.dumps(fixtures, indent=2) + "\n")


def run_suite() -> tuple[unittest.TestResult, str]:
    os.environ["SHOP_FIXTURES"] = str(CACHE)
    suite = unittest.defaultTestLoader.discover(str(HERE / "tests"), top_level_dir=str(HERE))
    stream = io.StringIO()
    result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    return result, stream.getvalue()


def record_run(database_url: str, summary: dict[str, object]) -> str:
    """Append the run to the staging database; returns a note on where it went."""
    prefix = "sqlite:///"
    if not database_url.startswith(prefix):
        return f"not recorded: the demo only supports {prefix}… database URLs"
    path = HERE / database_url.removeprefix(prefix)
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS test_runs "
            "(finished_at TEXT, artifact_sha256 TEXT, tests INTEGER, failures INTEGER, "
            "errors INTEGER)"
        )
        db.execute(
            "INSERT INTO test_runs VALUES (?, ?, ?, ?, ?)",
            tuple(
                summary[k]
                for k in ("finished_at", "artifact_sha256", "tests", "failures", "errors")
            ),
        )
    db.close()
    return f"recorded in {path.name}"


def main() -> int:
    if not MANIFEST.is_file():
        print(f"{MANIFEST.name} not found: {HERE} is not a deployment", file=sys.stderr)
        return 2
    manifest = json.loads(MANIFEST.read_text())
    if not cache_is_warm(manifest):
        warm_cache(manifest)
        print("fixture cache was cold and has been warmed; retry")
        return EX_TEMPFAIL
    result, output = run_suite()
    summary: dict[str, object] = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "artifact_sha256": manifest["artifact_sha256"],
        "tests": result.testsRun,
        "failures": len(result.failures),
        "errors": len(result.errors),
        "skipped": len(result.skipped),
        "ok": result.wasSuccessful(),
    }
    summary["database"] = record_run(manifest["database_url"], summary)
    RESULTS.write_text(json.dumps({**summary, "output": output[-4000:]}, indent=2) + "\n")
    print(output)
    print(json.dumps(summary))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
