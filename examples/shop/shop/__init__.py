"""A tiny shop: a catalog and cart pricing. The sample project agentloop's demo deploys."""

__version__ = "1.0.0"
