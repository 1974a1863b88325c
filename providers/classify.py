"""Which upstream failures mean what: one table, consulted once at the boundary.

Three tables, read top to bottom, first match wins:

- :data:`ERROR_CODE_CLASSES` — the provider's own error code or type, when it says
  more than the status (a 400 ``context_length_exceeded`` is not a client error:
  another model may take the prompt);
- :data:`MESSAGE_CLASSES` — phrases of providers that put the reason only in the
  message (Anthropic's "prompt is too long");
- :data:`STATUS_CLASSES` — the HTTP status, then the status family;
- :data:`EXCEPTION_CLASSES` — transport exceptions, when no response arrived.

DESIGN section 3 says what the router does with each class.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping

import httpx

from orchestrator.messages import ErrorClass
from providers.pool import ResponseTooLarge

__all__ = [
    "ERROR_CODE_CLASSES",
    "EXCEPTION_CLASSES",
    "MESSAGE_CLASSES",
    "STATUS_CLASSES",
    "classify_exception",
    "classify_response",
    "parse_retry_after",
]

T = ErrorClass

ERROR_CODE_CLASSES: Mapping[str, ErrorClass] = {
    "context_length_exceeded": T.TOO_LONG,
    "string_above_max_length": T.TOO_LONG,
    "request_too_large": T.TOO_LONG,
    "content_policy_violation": T.CLIENT_ERROR,
    "content_filter": T.CLIENT_ERROR,
    "invalid_api_key": T.MISCONFIGURED,
    "authentication_error": T.MISCONFIGURED,
    "permission_error": T.MISCONFIGURED,
    "model_not_found": T.MISCONFIGURED,
    "not_found_error": T.MISCONFIGURED,
}

MESSAGE_CLASSES: tuple[tuple[str, ErrorClass], ...] = (
    ("prompt is too long", T.TOO_LONG),
    ("maximum context length", T.TOO_LONG),
    ("context window", T.TOO_LONG),
)

STATUS_CLASSES: Mapping[int, ErrorClass] = {
    400: T.CLIENT_ERROR,
    401: T.MISCONFIGURED,
    403: T.MISCONFIGURED,
    404: T.MISCONFIGURED,
    408: T.TRANSIENT,
    413: T.TOO_LONG,
    422: T.CLIENT_ERROR,
    429: T.RATE_LIMITED,
    500: T.SERVER_ERROR,
    502: T.SERVER_ERROR,
    503: T.SERVER_ERROR,
    504: T.TRANSIENT,
    529: T.SERVER_ERROR,
}

EXCEPTION_CLASSES: tuple[tuple[type[Exception], ErrorClass, str], ...] = (
    (httpx.ConnectTimeout, T.TRANSIENT, "connect timeout"),
    (httpx.ConnectError, T.TRANSIENT, "cannot connect"),
    (httpx.UnsupportedProtocol, T.MISCONFIGURED, "unsupported URL"),
    (httpx.InvalidURL, T.MISCONFIGURED, "invalid URL"),
    (ResponseTooLarge, T.MALFORMED, "response body too large"),
    (httpx.RemoteProtocolError, T.TRANSIENT, "connection closed by the provider"),
    (httpx.ReadError, T.TRANSIENT, "connection reset while reading"),
    (httpx.WriteError, T.TRANSIENT, "connection reset while sending"),
    (httpx.DecodingError, T.MALFORMED, "undecodable response body"),
    (httpx.TimeoutException, T.SILENT, "timed out"),
    (httpx.TransportError, T.TRANSIENT, "transport error"),
)

#: A Retry-After longer than this is treated as this (a provider cannot park us for a day).
MAX_RETRY_AFTER = 3600.0


def classify_response(status: int, *, code: str | None = None, message: str = "") -> ErrorClass:
    """The class of a non-2xx response, from its error code, message and status."""
    if code is not None:
        by_code = ERROR_CODE_CLASSES.get(code)
        # A code never turns a server error into a client one, nor a 429 into anything.
        if by_code is not None and status < 500 and status != 429:
            return by_code
    if status in (400, 413):
        lowered = message.lower()
        for phrase, error_class in MESSAGE_CLASSES:
            if phrase in lowered:
                return error_class
    by_status = STATUS_CLASSES.get(status)
    if by_status is not None:
        return by_status
    if status >= 500:
        return T.SERVER_ERROR
    return T.CLIENT_ERROR


def classify_exception(error: Exception) -> tuple[ErrorClass, str]:
    """The class and a short description of a transport exception (no response)."""
    for exception_type, error_class, description in EXCEPTION_CLASSES:
        if isinstance(error, exception_type):
            return error_class, description
    return T.TRANSIENT, type(error).__name__


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        seconds = _finite(milliseconds)
        if seconds is not None:
            return min(max(seconds / 1000.0, 0.0), MAX_RETRY_AFTER)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _finite(value)
    if seconds is None:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
