"""The gateway's exceptions: one small tree, each error knowing its HTTP face.

::

    GatewayError                      status  type / code
    ├── InvalidRequest                400     invalid_request_error
    │   ├── BodyTooLarge              413     invalid_request_error / request_too_large
    │   ├── BodyTimeout               408     invalid_request_error / request_timeout
    │   ├── MethodNotAllowed          405     invalid_request_error / method_not_allowed
    │   └── ModelNotFound             404     invalid_request_error / model_not_found
    ├── AuthenticationError           401     authentication_error / invalid_api_key
    ├── UpstreamClientError           4xx     the provider's own error, passed through
    ├── RateLimited                   429     rate_limit_error (with Retry-After)
    ├── ServiceUnavailable            503     service_unavailable (with Retry-After)
    ├── AllProvidersFailed            502     upstream_error
    ├── DeadlineExceeded              504     timeout
    └── StreamInterrupted             —       raised by a stream after its commit point

Errors from the router carry the request id and the attempts made, and render in
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` with the
attempts listed beside it. Lower-level errors (httpx, h11, trio) never escape: the
provider actors map them to :class:`~orchestrator.messages.Failed` outcomes once.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "AllProvidersFailed",
    "Attempt",
    "AuthenticationError",
    "BodyTimeout",
    "BodyTooLarge",
    "DeadlineExceeded",
    "GatewayError",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "RateLimited",
    "ServiceUnavailable",
    "StreamInterrupted",
    "UpstreamClientError",
]


@attrs.frozen
class Attempt:
    """One step of a request's journey: a network attempt or a skipped provider."""

    number: int | None  # None for a provider skipped without a network call
    provider: str
    model: str
    outcome: str
    elapsed: float
    status: int | None = None

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "attempt": self.number,
            "provider": self.provider,
            "model": self.model,
            "outcome": self.outcome,
            "elapsed_ms": round(self.elapsed * 1000, 1),
        }
        if self.status is not None:
            entry["status"] = self.status
        return entry


class GatewayError(Exception):
    """Base of every error the gateway reports to a client.

    ``retry_after`` (seconds) becomes a ``Retry-After`` header; ``attempts`` lists
    the journey; ``should_retry`` False says the gateway already retried, so an
    SDK's own retry loop should not (``x-should-retry: false``).
    """

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        attempts: tuple[Attempt, ...] = (),
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.attempts = attempts
        self.request_id = request_id

    @property
    def should_retry(self) -> bool:
        return not self.attempts

    def response_headers(self) -> dict[str, str]:
        """The headers this error's HTTP response carries beside the request id."""
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(int(self.retry_after))
        if not self.should_retry:
            headers["x-should-retry"] = "false"
        network = [attempt for attempt in self.attempts if attempt.number is not None]
        headers["x-orchestrator-attempts"] = str(len(network))
        headers["x-orchestrator-provider"] = network[-1].provider if network else "none"
        return headers

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }
        if self.request_id is not None:
            body["error"]["request_id"] = self.request_id
        if self.attempts:
            body["error"]["attempts"] = [attempt.as_json() for attempt in self.attempts]
        return body


class InvalidRequest(GatewayError):
    """The request cannot succeed; no provider was called. ``param`` names the field."""

    status = 400
    error_type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class BodyTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class MethodNotAllowed(InvalidRequest):
    """The path exists, not for this method; ``allow`` lists the ones it takes (RFC 9110)."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.allow = allow

    def response_headers(self) -> dict[str, str]:
        return {**super().response_headers(), "allow": self.allow}


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class AuthenticationError(GatewayError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class UpstreamClientError(GatewayError):
    """The provider rejected the request itself (400/422 ...): its error, passed through."""

    def __init__(self, message: str, *, status: int, error: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status
        self.upstream_error = error or {}
        self.error_type = str(self.upstream_error.get("type") or "invalid_request_error")
        self.param = self.upstream_error.get("param", self.param)
        self.code = self.upstream_error.get("code", self.code)


class RateLimited(GatewayError):
    """Every deployment that could serve the request is rate limited."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(GatewayError):
    """Nothing can take the request now: circuits open, providers or the gateway saturated."""

    status = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class AllProvidersFailed(GatewayError):
    """Every deployment was tried and failed."""

    status = 502
    error_type = "upstream_error"
    code = "all_providers_failed"


class DeadlineExceeded(GatewayError):
    """The request's budget ran out (or cannot fit the next retry)."""

    status = 504
    error_type = "timeout"
    code = "deadline_exceeded"


class StreamInterrupted(GatewayError):
    """A stream failed after its commit point; the text received so far is incomplete.

    Over HTTP this becomes the stream's final error event (the status line was already
    sent); in the embedding API the chunk iterator raises it.
    """

    status = 502
    error_type = "upstream_error"
    code = "stream_interrupted"
