"""The errors a caller shows to the person who asked: one root, subclasses by what
went wrong. The store raises NotFound; the service raises all of them."""

from __future__ import annotations


class ServiceError(Exception):
    """Base for errors a caller should show to the person who asked."""


class InvalidInput(ServiceError):
    """The request itself is wrong; the message says what to change."""


class NotFound(ServiceError, LookupError):
    """No such run, step or approval."""


class Conflict(ServiceError):
    """The run is not in a state that allows the request (e.g. approving twice)."""


class Forbidden(ServiceError):
    """The person may not do this to this run."""
