"""Fault profiles and fault decisions: pure logic, no I/O.

A ``FaultProfile`` says how often each fault happens to one personality and how it
behaves. ``parse_failures_config`` validates a ``POST /config/failures`` body into the
personality it targets and its new profile. ``decide`` picks the fault for one
request from the profile and the personality's seeded generator.

Decision order. Every model request that passes validation draws exactly
``len(DECISION_ORDER)`` numbers from its personality's generator, one per fault kind in
this order, whether or not a fault is forced by header and whatever the probabilities::

    timeout, rate_limit, server_error, reset, slow_first_token,
    stream_cut, stream_stall, malformed_chunk, no_done

The first kind whose draw is below its probability is the request's one fault; the last
four apply to streaming requests only and are passed over for the others. So the n-th
request's fault depends only on the seed, n and the profile.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "DECISION_ORDER",
    "STREAM_ONLY",
    "Decision",
    "FaultKind",
    "FaultProfile",
    "ProfileError",
    "ProfileUpdate",
    "decide",
    "parse_fault_header",
    "parse_failures_config",
    "targets",
]


class FaultKind(enum.Enum):
    """A way for one request to go wrong; values are the names used on the wire."""

    TIMEOUT = "timeout"
    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    RESET = "reset"
    SLOW_FIRST_TOKEN = "slow_first_token"
    STREAM_CUT = "stream_cut"
    STREAM_STALL = "stream_stall"
    MALFORMED_CHUNK = "malformed_chunk"
    NO_DONE = "no_done"


DECISION_ORDER = tuple(FaultKind)
STREAM_ONLY = frozenset(
    {FaultKind.STREAM_CUT, FaultKind.STREAM_STALL, FaultKind.MALFORMED_CHUNK, FaultKind.NO_DONE}
)

PERSONALITIES = ("openai", "anthropic")


class ProfileError(ValueError):
    """A ``/config/failures`` body that cannot be a profile; ``field`` names the culprit."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _number(field: attrs.Attribute, value: object) -> float:
    # bool is an int subclass; true where a number belongs is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(field.name, f"{field.name} must be a number")
    if not math.isfinite(value):
        raise ProfileError(field.name, f"{field.name} must be finite")
    return float(value)


def _to_probability(value: object, field: attrs.Attribute) -> float:
    number = _number(field, value)
    if not 0 <= number <= 1:
        raise ProfileError(field.name, f"{field.name} must be between 0 and 1")
    return number


def _to_duration(value: object, field: attrs.Attribute) -> float:
    number = _number(field, value)
    if number < 0:
        raise ProfileError(field.name, f"{field.name} must not be negative")
    return number


def _to_count(value: object, field: attrs.Attribute) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(field.name, f"{field.name} must be an integer")
    if value < 0:
        raise ProfileError(field.name, f"{field.name} must not be negative")
    return value


def _to_flag(value: object, field: attrs.Attribute) -> bool:
    if not isinstance(value, bool):
        raise ProfileError(field.name, f"{field.name} must be true or false")
    return value


def _to_seed(value: object, field: attrs.Attribute) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProfileError(field.name, f"{field.name} must be an integer or null")
    return value


def _probability() -> Any:
    return attrs.field(default=0.0, converter=attrs.Converter(_to_probability, takes_field=True))


def _duration(default: float) -> Any:
    return attrs.field(default=default, converter=attrs.Converter(_to_duration, takes_field=True))


@attrs.frozen(kw_only=True)
class FaultProfile:
    """How one personality misbehaves. The defaults are a healthy provider.

    Probabilities are per request, in [0, 1]. Durations and counts only shape a fault
    when it happens, so their defaults make a fault meaningful when only its
    probability is given.
    """

    timeout_probability: float = _probability()
    #: The timeout fault sends nothing for this long, then answers 504.
    timeout_duration_seconds: float = _duration(3.0)
    rate_limit_probability: float = _probability()
    #: Sent as ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms``.
    retry_after_seconds: float = _duration(1.0)
    #: 500 or 503 for OpenAI, 500 or 529 for Anthropic.
    server_error_probability: float = _probability()
    #: The connection is reset before any response byte.
    reset_probability: float = _probability()
    #: The stream ends after this many content chunks, with no finish and no terminator.
    stream_cut_probability: float = _probability()
    stream_cut_after_chunks: int = attrs.field(
        default=2, converter=attrs.Converter(_to_count, takes_field=True)
    )
    #: stream_stall and malformed_chunk strike after this many content chunks: 0 puts
    #: them before the first content (before a gateway's commit point).
    stream_fault_after_chunks: int = attrs.field(
        default=1, converter=attrs.Converter(_to_count, takes_field=True)
    )
    #: The stream sends nothing for this long after ``stream_fault_after_chunks`` chunks.
    stream_stall_probability: float = _probability()
    stream_stall_seconds: float = _duration(30.0)
    #: A data line that is not JSON follows ``stream_fault_after_chunks`` content chunks.
    malformed_chunk_probability: float = _probability()
    #: Streams: the first content chunk waits this long (the role chunk does not).
    #: Non-streaming requests: the whole response waits this long.
    slow_first_token_probability: float = _probability()
    first_token_delay_seconds: float = _duration(5.0)
    #: The stream ends cleanly but without ``data: [DONE]`` / ``message_stop``.
    no_done_probability: float = _probability()
    #: Added before every model response (on top of the server's ``--latency-ms``).
    latency_ms: float = _duration(0.0)
    #: Pause between streamed content chunks.
    chunk_delay_ms: float = _duration(0.0)
    #: False: a trailing assistant message (a prefill) gets a 400.
    prefill_supported: bool = attrs.field(
        default=True, converter=attrs.Converter(_to_flag, takes_field=True)
    )
    #: Reseeds the personality's generator when the profile is set; null leaves it be.
    seed: int | None = attrs.field(
        default=None, converter=attrs.Converter(_to_seed, takes_field=True)
    )

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> FaultProfile:
        """Build from JSON fields; unknown or invalid fields raise ``ProfileError``."""
        for name in fields:
            if name not in _FIELD_NAMES:
                raise ProfileError(name, f"unknown field {name!r}")
        return cls(**fields)

    def probability(self, kind: FaultKind) -> float:
        return getattr(self, _PROBABILITY_FIELD[kind])

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


_FIELD_NAMES = frozenset(field.name for field in attrs.fields(FaultProfile))
#: Named once: ``decide`` looks up nine probabilities on every request.
_PROBABILITY_FIELD = {kind: f"{kind.value}_probability" for kind in FaultKind}


@attrs.frozen
class ProfileUpdate:
    """A validated ``/config/failures`` body: the new profile and who gets it."""

    provider: str
    profile: FaultProfile


def targets(provider: str) -> tuple[str, ...]:
    """The personalities ``provider`` names: ``"openai"``, ``"anthropic"`` or ``"all"``."""
    if provider == "all":
        return PERSONALITIES
    if provider in PERSONALITIES:
        return (provider,)
    raise ValueError("provider must be 'openai', 'anthropic' or 'all'")


def parse_failures_config(body: object) -> ProfileUpdate:
    """Validate a decoded ``/config/failures`` body.

    ``provider`` picks the target: ``"openai"`` (also when absent), ``"anthropic"``, or
    ``"all"``. Every other field is a ``FaultProfile`` field; those left out take their
    defaults, so ``{}`` restores a healthy provider.
    """
    if not isinstance(body, dict):
        raise ProfileError(None, "the body must be a JSON object")
    fields = dict(body)
    provider = fields.pop("provider", "openai")
    try:
        targets(provider)
    except (TypeError, ValueError) as error:
        raise ProfileError("provider", str(error)) from None
    return ProfileUpdate(provider, FaultProfile.from_fields(fields))


def parse_fault_header(value: str) -> FaultKind:
    """The fault an ``x-mock-fault`` header forces; ``ValueError`` for an unknown one."""
    try:
        return FaultKind(value.strip().lower())
    except ValueError:
        known = ", ".join(kind.value for kind in FaultKind)
        raise ValueError(f"unknown x-mock-fault {value!r}; known kinds: {known}") from None


@attrs.frozen
class Decision:
    """What happens to one request: no fault, or one, with its HTTP status if it has one."""

    fault: FaultKind | None = None
    status: int | None = None


HEALTHY = Decision()


def decide(
    profile: FaultProfile,
    rng: random.Random,
    *,
    streaming: bool,
    forced: FaultKind | None = None,
    server_error_statuses: tuple[int, ...] = (500, 503),
) -> Decision:
    """Draw one request's fault (see the module docstring for the order).

    ``forced`` (from the ``x-mock-fault`` header) wins over the draws, which are still
    consumed. A drawn server error picks its status from ``server_error_statuses`` by
    where its draw fell below the probability; a forced one takes the first.
    """
    draws = [rng.random() for _ in DECISION_ORDER]
    if forced is not None:
        return Decision(forced, _status(forced, server_error_statuses, 0))
    for kind, draw in zip(DECISION_ORDER, draws, strict=True):
        if kind in STREAM_ONLY and not streaming:
            continue
        probability = profile.probability(kind)
        if draw < probability:
            index = int(draw / probability * len(server_error_statuses))
            return Decision(kind, _status(kind, server_error_statuses, index))
    return HEALTHY


def _status(kind: FaultKind, server_error_statuses: tuple[int, ...], index: int) -> int | None:
    if kind is FaultKind.TIMEOUT:
        return 504
    if kind is FaultKind.RATE_LIMIT:
        return 429
    if kind is FaultKind.SERVER_ERROR:
        return server_error_statuses[index]
    return None
