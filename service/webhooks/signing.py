"""How a webhook is signed, two ways, on every delivery:

- Standard Webhooks (standardwebhooks.com, what many providers send and receivers' libraries
  verify): `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256
  of "id.timestamp.body">`. The timestamp is signed, so a captured delivery cannot be
  replayed later under a fresh one. A `whsec_` secret is base64 after its prefix, as the
  specification has it; any other secret is keyed by its UTF-8 bytes.
- The original headers, kept for receivers written against them: `X-ICS-Signature:
  sha256=<hex HMAC-SHA256 of the exact body>` (GitHub's scheme), keyed by the secret's UTF-8
  bytes, with `X-ICS-Delivery`, `X-ICS-Timestamp` and `X-ICS-Attempt` (unsigned).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SIGNATURE = "X-ICS-Signature"
DELIVERY = "X-ICS-Delivery"  # the same id on every attempt of one delivery
TIMESTAMP = "X-ICS-Timestamp"  # Unix seconds when this attempt was sent
ATTEMPT = "X-ICS-Attempt"  # 1 for the first attempt

WEBHOOK_ID = "webhook-id"  # the delivery id again: the same on every attempt
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
STANDARD_PREFIX = "whsec_"


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """Whether `header` is the signature of `body` (compared in constant time)."""
    return hmac.compare_digest(signature(body, secret), header)


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks signature; ValueError for a `whsec_` secret that
    is not base64."""
    if not secret.startswith(STANDARD_PREFIX):
        return secret.encode()
    try:
        return base64.b64decode(secret.removeprefix(STANDARD_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError(f"a secret starting {STANDARD_PREFIX} must be base64 after it") from None


def standard_signature(delivery_id: str, timestamp: int, body: bytes, key: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
