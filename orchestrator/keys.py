"""API keys: constant-time checks of bearer tokens, and the short ids logs show instead."""

from __future__ import annotations

import hashlib
import hmac
import logging

from orchestrator.errors import AuthenticationError
from orchestrator.logs import event

__all__ = ["authenticate", "key_id"]


def authenticate(header: str | None, keys: list[bytes], *, request_id: str, path: str) -> str:
    """Check an ``Authorization: Bearer`` header against ``keys``; return its key id.

    Raises :class:`AuthenticationError` when the header is missing, not a bearer token,
    or names no key in ``keys``. Every key is compared, in constant time, whatever
    matched, so timing says nothing about which key (or how much of one) was right.
    """
    scheme, _, token = (header or "").partition(" ")
    presented = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    if scheme.lower() != "bearer" or not matched:
        if presented:
            event(logging.INFO, request_id, "unauthorized", f"rejected key {key_id(presented)} on {path}")
        raise AuthenticationError(
            "Missing or invalid API key: send 'Authorization: Bearer <key>' with a key this gateway accepts."
        )
    return key_id(presented)


def key_id(key: bytes) -> str:
    """A short, non-reversible id of a key, for logs: ``key_1a2b3c4d``."""
    return "key_" + hashlib.sha256(key).hexdigest()[:8]
