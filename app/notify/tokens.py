"""Approval links: signed, expiring tokens bound to one approval, one approver and
the exact args they were shown.

A signature proves the link came from us and has not been altered; it cannot
make a link single-use. That comes from the approvals row, which leaves
`pending` exactly once (app/store/repo.py, decide_approval).
"""

from __future__ import annotations

from dataclasses import dataclass

from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer

# A different salt per purpose: a token signed for anything else never reads as this.
SALT = "agentloop.approval-link.v1"


class BadToken(Exception):
    """The link cannot be used; the message says why, for the person who clicked."""


class ExpiredToken(BadToken):
    pass


class InvalidToken(BadToken):
    pass


@dataclass(frozen=True)
class ApprovalClaim:
    approval_id: str
    approver: str
    args_hash: str


def _serializer(secret: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret, salt=SALT)


def sign_approval(secret: str, claim: ApprovalClaim) -> str:
    return str(
        _serializer(secret).dumps(
            {"a": claim.approval_id, "u": claim.approver, "h": claim.args_hash}
        )
    )


def read_approval(secret: str, token: str, *, max_age: float) -> ApprovalClaim:
    """The claim a token carries. Raises ExpiredToken, InvalidToken (forged, tampered,
    truncated, or signed with another key)."""
    try:
        data = _serializer(secret).loads(token, max_age=int(max_age))
    except SignatureExpired:
        raise ExpiredToken("this approval link has expired") from None
    except BadData:
        raise InvalidToken(
            "this approval link is not valid: it was altered or not sent by us"
        ) from None
    if not isinstance(data, dict):
        raise InvalidToken("this approval link is not valid")
    fields = [data.get("a"), data.get("u"), data.get("h")]
    if not all(isinstance(f, str) and f for f in fields):
        raise InvalidToken("this approval link is not valid")
    return ApprovalClaim(
        approval_id=str(fields[0]), approver=str(fields[1]), args_hash=str(fields[2])
    )
