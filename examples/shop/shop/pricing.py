"""Cart pricing."""

from __future__ import annotations

from collections.abc import Iterable

from shop.catalog import price_of

CartLine = tuple[str, int]


def cart_total(lines: Iterable[CartLine]) -> int:
    """The total of a cart in cents.

    `lines` are (sku, quantity) pairs. Raises KeyError for an unknown sku and
    ValueError for a quantity below one.
    """
    total = 0
    for sku, quantity in lines:
        if quantity < 1:
            raise ValueError(f"quantity of {sku!r} must be at least 1, got {quantity}")
        total += price_of(sku) * quantity
    return total
