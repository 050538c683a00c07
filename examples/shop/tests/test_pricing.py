import unittest

from shop.pricing import cart_total


class CartTotalTest(unittest.TestCase):
    def test_empty_cart_is_free(self) -> None:
        self.assertEqual(cart_total([]), 0)

    def test_sums_price_times_quantity(self) -> None:
        self.assertEqual(cart_total([("apple", 3), ("bread", 1)]), 3 * 120 + 450)

    def test_unknown_sku_is_refused(self) -> None:
        with self.assertRaises(KeyError):
            cart_total([("durian", 1)])

    def test_quantity_below_one_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            cart_total([("apple", 0)])


if __name__ == "__main__":
    unittest.main()
