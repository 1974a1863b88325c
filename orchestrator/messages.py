"""Messages between the router and the provider actors, and the outcomes they carry.

A requester (the router) talks to an actor like this::

    router                                   ProviderActor "openai"
      |  Call(scope, reply, ...) --inbox-->    admit? (rate limit, concurrency, breaker)
      |                                        |-- Refused(reason, retry_after) --> reply
      |                                        '-- start attempt task under call.scope
      |  <--reply-- Completed | Failed | StreamOpened
      |  (streaming) chunks.receive(): dict, dict, ..., StreamEnd | StreamBroken
      |              (read by the requester, in its own task, from the upstream response)

The requester owns ``call.scope`` and cancels it when it stops caring (client gone,
deadline spent); the actor runs the upstream attempt inside that scope, so the
upstream connection closes within a scheduling tick. Every reply goes through a
one-shot :class:`Reply`; the actor closes it after replying, so a requester whose
actor died sees ``trio.EndOfChannel`` at once instead of hanging.
"""

from __future__ import annotations

import enum
from typing import Any, Generic, Protocol, TypeVar

import attrs
import trio

__all__ = [
    "Call",
    "ChunkSource",
    "Completed",
    "ErrorClass",
    "Failed",
    "Outcome",
    "ProviderSnapshot",
    "Refused",
    "RefusalReason",
    "Reply",
    "ResetRequest",
    "SnapshotRequest",
    "StreamBroken",
    "StreamEnd",
    "StreamItem",
    "StreamOpened",
]


T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot reply channel: one value, sent once, received by one task.

    The sending side speaks like a ``trio.MemorySendChannel`` (``send_nowait``,
    ``close``, ``with reply:`` closes it); the receiving side has ``receive`` and
    ``abandon``. It is what ``open_memory_channel(1)`` would be here, without that
    channel's state, statistics and wait queues: a call holds one for as long as it
    is in flight, so with hundreds in flight the difference counts (about 1.7 KiB a
    call, and the channel's bookkeeping on every send and receive).
    """

    __slots__ = ("_closed", "_abandoned", "_receive_cancelled", "_has_value", "_value", "_waiter")

    def __init__(self) -> None:
        self._closed = False  # no value will come any more
        self._abandoned = False  # the receiver is gone
        self._receive_cancelled = False
        self._has_value = False
        self._value: T | None = None
        self._waiter: trio.lowlevel.Task | None = None

    # -- sending side (the actor) --

    def send_nowait(self, value: T) -> None:
        """Deliver the value. Raises ``trio.BrokenResourceError`` if the receiver has
        abandoned the reply, ``trio.ClosedResourceError`` if it is closed or sent."""
        if self._abandoned:
            raise trio.BrokenResourceError("the requester has gone")
        if self._closed:
            raise trio.ClosedResourceError("this reply was closed or sent already")
        self._value, self._has_value, self._closed = value, True, True
        self._wake()

    def close(self) -> None:
        """No value will come: a waiting (or later) ``receive`` raises ``trio.EndOfChannel``."""
        if not self._closed:
            self._closed = True
            self._wake()

    def __enter__(self) -> Reply[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- receiving side (the requester) --

    async def receive(self) -> T:
        """The value, once sent. Raises ``trio.EndOfChannel`` if the reply was closed
        without one. Blocks until then; cancelling it leaves the reply as it was."""
        if not self._closed:
            self._waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._waiter = None
                self._receive_cancelled = True
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            await trio.lowlevel.checkpoint()
        if not self._has_value:
            raise trio.EndOfChannel
        return self._value  # type: ignore[return-value]

    def abandon(self) -> None:
        """The receiver stops listening: a later ``send_nowait`` raises ``BrokenResourceError``."""
        self._abandoned = True

    @property
    def receive_cancelled(self) -> bool:
        """Whether a ``receive`` was cancelled while it waited: set as the cancellation
        is delivered, synchronously, by whoever cancelled the receiver's scope."""
        return self._receive_cancelled

    def _wake(self) -> None:
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None


class ErrorClass(enum.Enum):
    """What went wrong with an upstream attempt, as the router and the breaker see it.

    The table in DESIGN section 3 says what the router does with each class; only
    the classes that describe the provider's health count against its breaker.
    """

    #: 504/408, connect error, connection reset before a response: retry with backoff.
    TRANSIENT = "transient"
    #: No response (or no first token) within the attempt's own timeout: fail over.
    SILENT = "silent"
    #: 500/502/503/529: retry with backoff, like transient.
    SERVER_ERROR = "server_error"
    #: 429: fail over at once; the provider stays rate limited for Retry-After.
    RATE_LIMITED = "rate_limited"
    #: The prompt does not fit this model's context: fall back to the next deployment.
    TOO_LONG = "too_long"
    #: This provider cannot express the request (say ``n > 1``): try the next deployment.
    UNSUPPORTED = "unsupported"
    #: The request itself is bad: no retry, no failover, the error goes to the client.
    CLIENT_ERROR = "client_error"
    #: 401/403/404 from the provider: our configuration is wrong; fail over, log loudly.
    MISCONFIGURED = "misconfigured"
    #: The provider answered 200 with something that is not a valid answer.
    MALFORMED = "malformed"
    #: The request's own deadline cut the attempt short: not the provider's fault.
    DEADLINE = "deadline"

    @property
    def counts_against_provider(self) -> bool:
        return self in _COUNTED

    @property
    def retryable(self) -> bool:
        """Worth another try on the same provider after a backoff wait."""
        return self in _RETRYABLE


_COUNTED = frozenset(
    {
        ErrorClass.TRANSIENT,
        ErrorClass.SILENT,
        ErrorClass.SERVER_ERROR,
        ErrorClass.MISCONFIGURED,
        ErrorClass.MALFORMED,
    }
)
_RETRYABLE = frozenset({ErrorClass.TRANSIENT, ErrorClass.SERVER_ERROR, ErrorClass.MALFORMED})


class RefusalReason(enum.Enum):
    """Why an actor turned a call away without a network call."""

    CIRCUIT_OPEN = "circuit_open"
    RATE_LIMITED = "rate_limited"
    SATURATED = "saturated"


# -- requests to an actor -----------------------------------------------------------


@attrs.frozen(eq=False)
class Call:
    """Ask a provider for one upstream attempt.

    ``body`` is the client's validated OpenAI request with the upstream model name
    set; ``deadline`` is the request's absolute deadline (trio clock), which caps every
    timeout of the attempt. ``scope`` belongs to the requester: cancelling it abandons
    the attempt (not counted as a provider failure). ``reply`` receives exactly one
    :data:`Outcome` and is then closed.
    """

    request_id: str
    body: dict[str, Any]
    stream: bool
    deadline: float
    scope: trio.CancelScope
    reply: Reply[Outcome]

    @property
    def given_up(self) -> bool:
        """Whether the requester has stopped waiting: ``scope`` cancelled, or its wait
        for ``reply`` cancelled (the router never waits twice). The latter is true the
        moment the requester is cancelled, before its task next runs."""
        return self.scope.cancel_called or self.reply.receive_cancelled


@attrs.frozen(eq=False)
class SnapshotRequest:
    """Ask an actor for a :class:`ProviderSnapshot` of its state."""

    reply: Reply[ProviderSnapshot]


@attrs.frozen(eq=False)
class ResetRequest:
    """Ask an actor to close its circuit and forget its rate limit (an admin action).

    The reply is the :class:`ProviderSnapshot` after the reset.
    """

    reply: Reply[ProviderSnapshot]
    reason: str


# -- outcomes -----------------------------------------------------------------------


@attrs.frozen
class Completed:
    """A whole non-streaming answer, already in OpenAI's chat.completion shape."""

    completion: dict[str, Any]
    elapsed: float


@attrs.frozen
class Failed:
    """The attempt failed; ``error_class`` tells the router what to do next.

    ``status`` is the upstream HTTP status (None when no response arrived), ``code``
    and ``error_type`` come from the provider's error body, and ``retry_after`` from
    its ``Retry-After`` header. ``error`` is the provider's error already in OpenAI's
    shape, for errors that are passed through to the client.
    """

    error_class: ErrorClass
    message: str
    elapsed: float
    status: int | None = None
    code: str | None = None
    error_type: str | None = None
    retry_after: float | None = None
    error: dict[str, Any] | None = None


@attrs.frozen
class Refused:
    """The actor turned the call away without touching the network."""

    reason: RefusalReason
    retry_after: float | None = None


@attrs.frozen(eq=False)
class StreamOpened:
    """The upstream stream produced its first content (the commit point).

    ``head`` holds the chunks read so far (role chunk and first content, in OpenAI's
    chat.completion.chunk shape); the rest come from ``chunks``, which gives exactly
    one :class:`StreamEnd` or :class:`StreamBroken` last.
    """

    head: tuple[dict[str, Any], ...]
    chunks: ChunkSource
    elapsed: float


class ChunkSource(Protocol):
    """The rest of a committed stream, read by its requester like a trio receive channel.

    ``receive`` blocks until the provider's next chunk or the stream's ending (each
    wait bounded by the provider's idle timeout and the request's deadline; silence
    past it is a :class:`StreamBroken`) and raises ``trio.EndOfChannel`` after the
    ending. ``receive_nowait`` gives what has already been received, or raises
    ``trio.WouldBlock``. ``close`` abandons the stream before its ending (synchronous,
    never blocks); reading after it raises ``trio.ClosedResourceError``. One task
    reads. Unlike a channel, a ``receive`` cancelled while it waits for the network
    abandons the stream: the next one gives a :class:`StreamBroken`.
    """

    async def receive(self) -> StreamItem: ...

    def receive_nowait(self) -> StreamItem: ...

    def close(self) -> None: ...

    def __aiter__(self) -> ChunkSource: ...

    async def __anext__(self) -> StreamItem: ...


@attrs.frozen
class StreamEnd:
    """The upstream stream finished properly."""

    finish_reason: str | None
    usage: dict[str, Any] | None


@attrs.frozen
class StreamBroken:
    """The upstream stream failed after it started; what was sent so far is incomplete."""

    error_class: ErrorClass
    message: str


Outcome = Completed | Failed | Refused | StreamOpened
StreamItem = dict[str, Any] | StreamEnd | StreamBroken


@attrs.frozen
class ProviderSnapshot:
    """An actor's state at one instant, for /health and metrics."""

    name: str
    kind: str
    circuit: str
    consecutive_failures: int
    open_until: float | None
    rate_limited_until: float | None
    in_flight: int
    max_concurrency: int
    totals: dict[str, int]
    #: How many times the circuit changed state since the actor started.
    circuit_transitions: int = 0

    def as_json(self, now: float) -> dict[str, Any]:
        """The snapshot for /health: absolute times become seconds from ``now``."""
        return {
            "kind": self.kind,
            "circuit": self.circuit,
            "consecutive_failures": self.consecutive_failures,
            "open_for_seconds": _remaining(self.open_until, now),
            "rate_limited": self.rate_limited_until is not None and self.rate_limited_until > now,
            "rate_limited_for_seconds": _remaining(self.rate_limited_until, now),
            "in_flight": self.in_flight,
            "max_concurrency": self.max_concurrency,
            "totals": dict(self.totals),
            "circuit_transitions": self.circuit_transitions,
        }


def _remaining(until: float | None, now: float) -> float | None:
    if until is None or until <= now:
        return None
    return round(until - now, 3)
