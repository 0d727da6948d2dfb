"""Signing and verifying callbacks (Standard Webhooks 1.0, https://www.standardwebhooks.com/).

Headers ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` = ``v1,<base64
HMAC-SHA256 of "id.timestamp.body">``, one per secret, space-separated, so that during a
secret rotation a receiver holding either the old or the new secret accepts the message.
Secrets are ``whsec_`` + base64 of 24-64 random bytes (:func:`generate_secret`).

Both directions go through the ``standardwebhooks`` package; what is added here is the
strict reading of secrets and of the received headers, so that a malformed secret is a
configuration error and a malformed header a rejection, never a crash. A receiver checks a
delivery with :func:`verify` and should also drop ids it has already processed: retries
reuse the same ``webhook-id``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import secrets as _secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["generate_secret", "sign", "verify"]

_SECRET_PREFIX = "whsec_"
_MSG_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces (a header value)


def generate_secret(nbytes: int = 32) -> str:
    """A fresh signing secret in Standard Webhooks form: ``whsec_`` + base64 of nbytes."""
    if not 24 <= nbytes <= 64:
        raise ValueError("a webhook secret should have 24 to 64 bytes")
    return _SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode("ascii")


def _secret_key(secret: str) -> bytes:
    """Decode ``whsec_<base64>`` strictly (the library silently drops non-base64 chars)."""
    bad = ValueError("a webhook secret must be 'whsec_' + base64 of 24-64 bytes")
    if not isinstance(secret, str):
        raise bad
    secret = secret.strip()
    if not secret.startswith(_SECRET_PREFIX):
        raise bad
    encoded = secret[len(_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise bad from None
    if not 24 <= len(key) <= 64:
        raise bad
    return key


@functools.lru_cache(maxsize=16)
def _signer(secret: str) -> Webhook:
    """The signer of one secret, read once per process (every callback is signed)."""
    return Webhook(_secret_key(secret))


def sign(*, secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers: webhook-id, webhook-timestamp, webhook-signature.

    The signature header holds ``v1,<b64>`` for each secret, space-separated, so a receiver
    holding either secret during a rotation accepts it. Raises ValueError for a malformed
    secret, an empty secret list, a bad id or timestamp, or a body that is not UTF-8.
    """
    if isinstance(secrets, str):
        raise ValueError("secrets must be a list of secrets, not one string")
    if not secrets:
        raise ValueError("at least one webhook secret is needed")
    if not isinstance(msg_id, str) or not _MSG_ID_RE.fullmatch(msg_id):
        raise ValueError("msg_id must be 1-256 printable ASCII characters without spaces")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError("timestamp must be a non-negative integer (Unix seconds)")
    try:
        text = body.decode("utf-8")  # the library signs str; JSON bodies are UTF-8
    except UnicodeDecodeError:
        raise ValueError("the callback body must be UTF-8 (JSON)") from None
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    signatures = dict.fromkeys(  # ordered, without duplicates
        _signer(secret).sign(msg_id, when, text) for secret in secrets
    )
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


class _WebhookWithTolerance(Webhook):
    """The library's verification with the caller's timestamp tolerance.

    The library checks the timestamp against a fixed five minutes in a private method
    (``Webhook.__verify_timestamp``, name-mangled); this class replaces that one step and
    leaves the header reading, signing and signature comparison to the library. Were the
    method renamed, the library's own five-minute check would apply instead
    (tests/test_callbacks.py checks a wider tolerance).
    """

    def __init__(self, key: bytes, *, tolerance_s: int) -> None:
        super().__init__(key)
        self._tolerance_s = tolerance_s

    def _Webhook__verify_timestamp(self, timestamp_header: str) -> datetime:
        timestamp = timestamp_header.strip()
        if not re.fullmatch(r"[0-9]{1,12}", timestamp):
            raise WebhookVerificationError("invalid webhook-timestamp")
        sent_at, now = int(timestamp), time.time()
        if sent_at < now - self._tolerance_s:
            raise WebhookVerificationError("message timestamp too old")
        if sent_at > now + self._tolerance_s:
            raise WebhookVerificationError("message timestamp too new")
        return datetime.fromtimestamp(sent_at, tz=UTC)


def verify(*, secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: int = 300) -> dict[str, Any]:
    """Check a received callback; return its parsed JSON object.

    Raises ``standardwebhooks.webhooks.WebhookVerificationError`` for missing headers, a
    timestamp more than ``tolerance_s`` away from now, a body or id that does not match any
    ``v1`` signature, a malformed signature header, or a body that is not a JSON object;
    ValueError for a malformed ``secret`` (the receiver's own configuration is wrong).
    ``headers`` may be any mapping with ``items()`` (dict in any case, httpx.Headers,
    http.server's message). Replays within the tolerance window pass: remember the
    ``webhook-id`` values already processed and drop repeats.
    """
    key = _secret_key(secret)
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    if "webhook-signature" in lowered:  # the library splits on single spaces
        lowered["webhook-signature"] = " ".join(lowered["webhook-signature"].split())
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookVerificationError("body is not UTF-8") from None
    try:
        _WebhookWithTolerance(key, tolerance_s=tolerance_s).verify(text, lowered, json_parse=False)
    except ValueError:  # the library unpacks each signature as 'version,base64' and raises on others
        raise WebhookVerificationError("malformed webhook-signature") from None
    try:
        payload = json.loads(text)
    except ValueError:
        raise WebhookVerificationError("body is not JSON") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return payload
