"""Smoke tests against the fixture cache that run_tests.py keeps next to a deployment.

Skipped when SHOP_FIXTURES is not set (a plain `python -m unittest` in a checkout).
"""

import json
import os
import unittest
from pathlib import Path

from shop.catalog import CATALOG
from shop.pricing import cart_total

FIXTURES = os.environ.get("SHOP_FIXTURES", "")


@unittest.skipUnless(FIXTURES, "SHOP_FIXTURES is not set; run through run_tests.py")
class FixtureCacheTest(unittest.TestCase):
    def setUp(self) -> None:
        self.fixtures = json.loads(Path(FIXTURES).read_text())

    def test_cache_matches_the_deployed_catalog(self) -> None:
        prices = {sku: item.price_cents for sku, item in CATALOG.items()}
        self.assertEqual(self.fixtures["catalog"], prices)

    def test_sample_carts_price_as_recorded(self) -> None:
        for cart in self.fixtures["carts"]:
            lines = [(sku, quantity) for sku, quantity in cart["lines"]]
            self.assertEqual(cart_total(lines), cart["expected_cents"], cart["lines"])


if __name__ == "__main__":
    unittest.main()
