"""The catalog: what the shop sells, priced in cents so totals are exact."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    sku: str
    name: str
    price_cents: int


CATALOG: dict[str, Item] = {
    item.sku: item
    for item in (
        Item("apple", "Apple", 120),
        Item("bread", "Sourdough loaf", 450),
        Item("coffee", "Coffee beans, 250 g", 899),
        Item("milk", "Milk, 1 l", 135),
    )
}


def price_of(sku: str) -> int:
    """The unit price of `sku` in cents. Raises KeyError for an unknown sku."""
    try:
        return CATALOG[sku].price_cents
    except KeyError:
        raise KeyError(f"unknown sku {sku!r}") from None
