"""How a webhook is signed: `X-ICS-Signature: sha256=<hex HMAC-SHA256 of the exact body>`,
keyed by `--webhook-secret` (GitHub's scheme, so receivers know it). The delivery id and the
timestamp headers let a receiver drop a delivery it already has, or one too old."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE = "X-ICS-Signature"
DELIVERY = "X-ICS-Delivery"  # the same id on every attempt of one delivery
TIMESTAMP = "X-ICS-Timestamp"  # Unix seconds when this attempt was sent
ATTEMPT = "X-ICS-Attempt"  # 1 for the first attempt


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """Whether `header` is the signature of `body` (compared in constant time)."""
    return hmac.compare_digest(signature(body, secret), header)
