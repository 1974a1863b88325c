"""The provider actor: one long-lived trio task per provider, owner of its health.

::

    inbox (bounded) ──► ProviderActor.run ── admit ──► attempt task (one per call,
      Call, SnapshotRequest   │                          in the actor's nursery,
                              │ refuse at once:          under call.scope)
                              │   rate limited,            │ upstream HTTP via httpx
                              │   saturated,               │ reply: Completed | Failed
                              │   circuit open             │        | StreamOpened
                              v                            v
                      reply: Refused               settle: breaker, rate limit, totals

The actor is the only code that reads or changes its breaker, its rate-limit state,
its in-flight count and its totals (the attempt tasks are the actor's own tasks;
trio runs them one at a time, and no state is read across an ``await``). The one
exception is in time, not in owner: a committed stream is read by its requester
(``_Tail``), which settles the attempt by calling the actor's own ``_release``,
synchronously, the moment it reads the stream's ending.

**Cancellation.** Each attempt runs inside ``call.scope``, which belongs to the
requester: cancelling it closes the upstream connection at once, and the attempt
counts as neither success nor failure (a half-open probe gives its slot back).
Each attempt's own timeouts (response, first token, idle) are capped by the
request's deadline: a non-streaming attempt's is the deadline of ``call.scope``
itself, a stream's are cancel scopes inside it, and after the commit point around
each of the requester's reads. An attempt cut short by the
request's deadline rather than by the provider's own timeout is not held against
the provider.

**Failure.** What a provider does wrong (an error, a reset, silence, a body that does
not decode) is an outcome of its call. What an attempt raises besides is the
gateway's own bug: logged, and that call fails, not the actor. If the actor's loop
itself dies, the exception propagates to the service's nursery (the gateway fails
loudly rather than living on without a provider), and every call still queued or in
flight has its reply channel closed, so its requester sees ``trio.EndOfChannel`` at
once instead of hanging.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio

from orchestrator.config import ProviderConfig
from orchestrator.logs import event
from orchestrator.messages import (
    Call,
    Completed,
    ErrorClass,
    Failed,
    Outcome,
    ProviderSnapshot,
    RefusalReason,
    Refused,
    Reply,
    ResetRequest,
    SnapshotRequest,
    StreamBroken,
    StreamEnd,
    StreamItem,
    StreamOpened,
)
from providers.adapter import (
    Adapter,
    MalformedResponse,
    MalformedStream,
    ProviderStreamError,
    StreamDecoder,
    UnsupportedRequest,
    UpstreamRequest,
)
from providers.breaker import Admission, Breaker, CircuitState, Verdict, describe_transition
from providers.classify import classify_exception, classify_response, parse_retry_after
from providers.pool import KEEPALIVE_EXPIRY, ClientPool, body_pieces
from providers.redact import Redactor
from providers.sse import ServerSentEvent, SSEDecoder

__all__ = ["ActorHandle", "ActorStopped", "ProviderActor", "make_adapter"]

logger = logging.getLogger("orchestrator.provider")

#: How long past the request's deadline a committed stream's attempt waits for its
#: requester to read the stream's ending before it gives up (see ``_Tail``).
STREAM_GRACE = 1.0
#: Largest error body read from a provider before it is classified.
MAX_ERROR_BODY = 64 * 1024
#: After a stream's last event, how long the rest of its body (the chunked encoding's
#: terminator, as a rule) may take to arrive so that the connection can be kept.
DRAIN_SECONDS = 0.1
#: ... and how many bytes of it are read before the connection is given up instead.
DRAIN_BYTES = 16 * 1024

_SUCCESS = "ok"

#: Below this many attempts in flight, the calls waiting in a provider's inbox are all
#: admitted in one pass of the scheduler; from it on, one a pass (see ``ProviderActor.run``).
ADMIT_TOGETHER_BELOW = 64

#: Room in a provider's inbox for calls given up while they waited, in multiples of the
#: live calls it holds: a memory bound, reached only if clients keep leaving and
#: coming back faster than the actor passes their dead calls.
INBOX_SLACK = 4

#: What an upstream call raises when the provider fails it: the transport's errors, and
#: httpx's for a body that its ``Content-Encoding`` does not decode (a corrupt gzip
#: stream is the provider's failure, classified as malformed, not the gateway's crash).
UPSTREAM_ERRORS = (httpx.TransportError, httpx.DecodingError)

#: What an attempt reports to its own accounting: the outcome delivered (``_SUCCESS``
#: for a stream that finished), the break of a stream, or None when abandoned.
Verdict_ = Outcome | StreamBroken | str | None


class ActorStopped(Exception):
    """The provider's actor is not running (the service is stopping or has failed)."""


def make_adapter(config: ProviderConfig) -> Adapter:
    """The wire-format adapter for a provider's ``kind``."""
    if config.kind == "anthropic":
        from providers.anthropic import AnthropicAdapter

        return AnthropicAdapter(config)
    from providers.openai import OpenAIAdapter

    return OpenAIAdapter(config)


@attrs.frozen(eq=False)
class ActorHandle:
    """What the router holds: a provider's name and the send side of its inbox.

    Its ``_waiting`` set is shared with the actor: the calls in the inbox that the actor
    has not taken yet (``submit`` adds, the actor removes).
    """

    name: str
    kind: str
    _inbox: trio.MemorySendChannel[Call | SnapshotRequest | ResetRequest]
    _waiting: set[Call]
    _capacity: int

    def submit(self, call: Call) -> bool:
        """Hand ``call`` to the actor without blocking; False if ``capacity`` calls that
        someone still waits for are already in its inbox.

        Raises :class:`ActorStopped` if the actor is gone.
        """
        waiting = self._waiting
        if len(waiting) >= self._capacity:
            # Calls given up while they waited (``Call.given_up``) stay in the inbox
            # until the actor passes them, but no longer count: when hundreds of clients
            # leave at once and come straight back, the returning ones must not be
            # refused as saturated for the dead calls of the ones that left.
            waiting.difference_update([queued for queued in waiting if queued.given_up])
            if len(waiting) >= self._capacity:
                return False
        try:
            self._inbox.send_nowait(call)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorStopped(f"the actor for provider {self.name!r} is not running") from None
        waiting.add(call)
        return True

    async def snapshot(self) -> ProviderSnapshot:
        """The actor's state now; blocks only for the actor's answer."""
        return await self._ask(SnapshotRequest)

    async def reset(self, reason: str) -> ProviderSnapshot:
        """Close the circuit and clear the rate limit; returns the state afterwards."""
        return await self._ask(lambda reply: ResetRequest(reply, reason))

    async def _ask(self, message: Any) -> ProviderSnapshot:
        reply: Reply[ProviderSnapshot] = Reply()
        try:
            await self._inbox.send(message(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorStopped(f"the actor for provider {self.name!r} is not running") from None
        try:
            return await reply.receive()
        except trio.EndOfChannel:
            raise ActorStopped(f"the actor for provider {self.name!r} stopped") from None
        finally:
            reply.abandon()


class ProviderActor:
    """One provider: its adapter, its connection pools, its breaker and its limits.

    Start it with ``handle = await nursery.start(actor.run)``. ``transport``
    replaces the network for every upstream call (tests serve the mock in-process).
    """

    def __init__(
        self,
        config: ProviderConfig,
        *,
        adapter: Adapter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self._adapter = adapter if adapter is not None else make_adapter(config)
        self._transport = transport
        #: Masks this provider's key in every text taken from its answers (see redact.py).
        self._redact = Redactor.for_key(config.api_key)
        self._breaker = Breaker(config.breaker)
        self._rate_limited_until: float | None = None
        self._totals: Counter[str] = Counter()
        self._transitions = 0
        self._prepared: dict[tuple[Any, ...], tuple[httpx.URL, list[tuple[bytes, bytes]]]] = {}
        # The inbox holds ``capacity`` calls that someone waits for (``ActorHandle.submit``
        # counts them); its channel has room for INBOX_SLACK times as many, dead ones too.
        self._capacity = max(64, config.max_concurrency)
        self._waiting: set[Call] = set()
        #: The slots held by admitted attempts: as many as are in flight.
        self._slots: set[_Slot] = set()
        self._pool: ClientPool | None = None  # while running
        self._inbox_send, self._inbox = trio.open_memory_channel[Call | SnapshotRequest | ResetRequest](
            INBOX_SLACK * self._capacity
        )

    async def run(self, *, task_status: trio.TaskStatus[ActorHandle] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox until cancelled. Reports its :class:`ActorHandle` once ready."""
        pool = ClientPool(
            shards=self.config.pool_shards,
            # One connection per attempt, and as many again for finished streams still
            # draining (for DRAIN_SECONDS at most) after their attempt gave back its slot:
            # max_concurrency, not the pool, is what refuses or holds up new work.
            max_connections=2 * self.config.max_concurrency,
            connect_timeout=self.config.timeouts.connect,
            transport=self._transport,
        )
        self._pool = pool
        # The next live message, taken out of the inbox, between two passes.
        held: Call | SnapshotRequest | ResetRequest | None = None
        try:
            async with trio.open_nursery() as attempts:
                sweeping = trio.CancelScope()
                attempts.start_soon(_close_stale_connections, pool, sweeping)
                task_status.started(
                    ActorHandle(self.config.name, self.config.kind, self._inbox_send, self._waiting, self._capacity)
                )
                # Under overload the inbox is the queue: a call waiting here costs its
                # requester's task and little else, where an admitted one holds an
                # attempt task and an upstream connection. So from ADMIT_TOGETHER_BELOW
                # attempts in flight on, one message per pass of the scheduler
                # (admitting every waiting call at once was tried: 12% less CPU per
                # request with 500 in flight, but memory in flight grew by a quarter).
                # Below it, a burst of calls is admitted in the pass it arrives in.
                # One a pass there made the last of 50 calls that arrived together wait
                # 50 passes, each long with the work of the streams being answered
                # meanwhile: at 50 concurrent streams, half the requests waited 24 ms
                # or more here before their upstream call started.
                # Calls given up while they waited are dropped in the pass that finds
                # them, however many: when hundreds of clients leave at once and come
                # back (a load balancer or SDK timing out), their dead calls would
                # otherwise stay in the inbox for hundreds of passes. They do not count
                # against its bound (see ``ActorHandle.submit``).
                while True:
                    if held is None:
                        try:
                            message = await self._inbox.receive()
                        except trio.EndOfChannel:
                            break
                    else:
                        await trio.lowlevel.checkpoint()
                        message, held = held, None
                    self._handle(message, attempts, pool)
                    held = self._next_live_message()
                    while held is not None and len(self._slots) < ADMIT_TOGETHER_BELOW:
                        self._handle(held, attempts, pool)
                        held = self._next_live_message()
                sweeping.cancel()  # the attempts in flight still finish
        finally:
            if held is not None:  # stopped between two passes: answered as the queued ones are
                held.reply.close()
            self._close_inbox()
            await pool.aclose()

    def _handle(self, message: Call | SnapshotRequest | ResetRequest, attempts: trio.Nursery, pool: ClientPool) -> None:
        if isinstance(message, Call):
            self._waiting.discard(message)
            self._admit(message, attempts, pool)
            return
        if isinstance(message, ResetRequest):
            self._reset(message.reason)
        message.reply.send_nowait(self._snapshot())
        message.reply.close()

    def _next_live_message(self) -> Call | SnapshotRequest | ResetRequest | None:
        """The inbox's next message that is not a call its requester has given up on
        (those are dropped); None if there is none now. Never blocks."""
        while True:
            try:
                message = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return None
            if not (isinstance(message, Call) and message.given_up):
                return message
            self._waiting.discard(message)
            message.reply.close()

    # -- admission (synchronous: no await between reading and writing state) ------

    def _admit(self, call: Call, attempts: trio.Nursery, pool: ClientPool) -> None:
        if call.given_up:  # the requester gave up while the call was queued
            call.reply.close()
            return
        now = trio.current_time()
        if self._rate_limited_until is not None:
            if now < self._rate_limited_until:
                self._refuse(call, RefusalReason.RATE_LIMITED, self._rate_limited_until - now)
                return
            self._rate_limited_until = None
        if len(self._slots) >= self.config.max_concurrency:
            self._release_given_up()
            if len(self._slots) >= self.config.max_concurrency:
                self._refuse(call, RefusalReason.SATURATED, None)
                return
        before = self._breaker
        self._breaker, admission = before.admit(now)
        self._log_transition(before, call.request_id)
        if admission.verdict is Verdict.REFUSED:
            self._refuse(call, RefusalReason.CIRCUIT_OPEN, admission.retry_after)
            return
        slot = _Slot(admission, call)
        self._slots.add(slot)
        attempts.start_soon(self._attempt, call, slot, pool, name=_ATTEMPT_TASK_NAME)

    def _release_given_up(self) -> None:
        """Give back now the slots of attempts whose requesters have given up.

        Such an attempt is cancelled, or will be when its requester next runs, and gives
        its slot back as it ends, with no verdict: which is what this does at once. When
        hundreds of clients leave and come straight back, a burst admitted together is
        given up together, and the returning calls can reach the actor before those
        attempts have run again: they would be refused as saturated for slots that are
        as good as free. Looked for only at the limit (it goes over every slot)."""
        for slot in [slot for slot in self._slots if slot.call is not None and slot.call.given_up]:
            self._release(slot, None)

    def _refuse(self, call: Call, reason: RefusalReason, retry_after: float | None) -> None:
        self._totals[reason.value] += 1
        _reply(call, Refused(reason, retry_after))
        call.reply.close()

    # -- one attempt ----------------------------------------------------------------

    async def _attempt(self, call: Call, slot: _Slot, pool: ClientPool) -> None:
        """One admitted call, in a task of the actor's: reply, then settle the breaker.

        Whatever the attempt raises that is not the provider's failure (those become
        outcomes where they happen) is the gateway's own bug: it is logged and ends
        this call with a transient failure, and never the actor, whose end would end
        every call to the provider.
        """
        verdict: Verdict_ = None
        try:
            with call.reply:
                started = trio.current_time()
                with call.scope:
                    try:
                        if call.stream:
                            verdict = await self._stream(call, pool.next(), slot)
                        else:
                            verdict = await self._complete(call, pool.next(), slot)
                    except Exception:
                        logger.exception("%s: an attempt failed inside the gateway", self.config.name,
                                         extra={"request_id": call.request_id})
                        failure = Failed(ErrorClass.TRANSIENT, f"the gateway failed while calling {self.config.name}",
                                         trio.current_time() - started)
                        verdict = _reply(call, failure)
                if call.scope.cancelled_caught and slot.silence is not None:
                    what, own, waited_since, deadline = slot.silence
                    if trio.current_time() >= deadline:
                        # The attempt's own deadline, on the call's scope, has passed (not
                        # the requester giving up, which is no failure of the provider's).
                        verdict = _reply(call, _silence(own, what, trio.current_time() - waited_since))
        finally:
            self._release(slot, verdict)

    def _release(self, slot: _Slot, verdict: Verdict_) -> None:
        """Give ``slot`` back, once: its place in ``max_concurrency``, and its breaker
        admission with the attempt's ``verdict``."""
        call = slot.call
        if call is not None:
            # Let go of the call: its reply can hold a stream whose tail holds this slot.
            slot.call = None
            self._slots.discard(slot)
            self._settle(verdict, slot.admission, call.request_id)

    def _http_request(self, upstream: UpstreamRequest) -> httpx.Request:
        """The httpx request for ``upstream``, built without httpx's per-request merging.

        An adapter's URLs and headers never change, so their parsed forms are kept;
        only the body and its length are new each time (the hot path of every call).
        """
        key = (upstream.url, *upstream.headers.items())
        prepared = self._prepared.get(key)
        if prepared is None:
            url = httpx.URL(upstream.url)
            raw = [(b"host", url.netloc), *_DEFAULT_HEADERS,
                   *((name.encode(), value.encode()) for name, value in upstream.headers.items())]
            if len(self._prepared) < 64:  # a handful of URL and header sets per adapter
                self._prepared[key] = (url, raw)
            prepared = (url, raw)
        url, raw = prepared
        content = upstream.content
        headers = [*raw, (b"content-length", str(len(content)).encode())]
        return httpx.Request("POST", url, headers=headers, stream=httpx.ByteStream(content))

    def _translate(self, call: Call) -> UpstreamRequest | Failed:
        """The upstream request for ``call``, or why this provider cannot take it.

        The body is client input: whatever the adapter trips on must end this attempt
        (the next deployment may take it), never the actor and with it the gateway.
        """
        try:
            return self._adapter.request(call.body, stream=call.stream)
        except UnsupportedRequest as error:
            return Failed(ErrorClass.UNSUPPORTED, str(error), 0.0)
        except Exception:
            logger.exception("%s could not translate a request", self.config.name, extra={"request_id": call.request_id})
            return Failed(ErrorClass.UNSUPPORTED, f"the gateway could not translate this request for {self.config.name}", 0.0)

    async def _complete(self, call: Call, client: httpx.AsyncClient, slot: _Slot) -> Verdict_:
        """One non-streaming attempt. Its deadline is put on ``call.scope``, which
        ``_attempt`` has entered, rather than on a scope of its own (one fewer per
        call): past it, the call is cancelled and ``_attempt`` replies with the silence
        noted in ``slot``. Nothing after the answer arrives is a checkpoint, so an
        answer in time is never cut by the deadline passing just after it."""
        started = trio.current_time()
        upstream = self._translate(call)
        if isinstance(upstream, Failed):
            return _reply(call, upstream)
        deadline, own = self._deadline(started, self.config.timeouts.attempt, call.deadline)
        slot.silence = ("no response", own, started, deadline)
        call.scope.deadline = deadline
        try:
            response = await client.send(self._http_request(upstream))
        except UPSTREAM_ERRORS as error:
            outcome = _transport_failure(error, trio.current_time() - started)
        else:
            outcome = self._answer(response.status_code, response.headers, response.content, started, call.body)
        return _reply(call, outcome)

    def _answer(
        self, status: int, headers: httpx.Headers, payload: bytes, started: float, body: dict[str, Any]
    ) -> Outcome:
        elapsed = trio.current_time() - started
        if 200 <= status < 300:
            try:
                return Completed(self._adapter.completion(payload, body), elapsed)
            except MalformedResponse as error:  # its text can quote the answer
                return Failed(ErrorClass.MALFORMED, self._redact.text(str(error)), elapsed, status=status)
            except Exception:  # an answer our adapter chokes on is a malformed answer
                logger.exception("%s sent an answer the adapter could not read", self.config.name)
                return Failed(ErrorClass.MALFORMED, "an answer the gateway could not read", elapsed, status=status)
        return self._failure(status, headers, payload, elapsed)

    def _failure(self, status: int, headers: httpx.Headers, payload: bytes, elapsed: float) -> Failed:
        reported = self._adapter.error(status, payload)
        # Classified on the provider's own words (a mask could hide a phrase the
        # classification looks for); everything kept from them is masked.
        error_class = classify_response(status, code=reported.code, message=reported.message)
        error = self._redact.error(reported)
        return Failed(
            error_class,
            error.message,
            elapsed,
            status=status,
            code=error.code,
            error_type=error.error_type,
            retry_after=parse_retry_after(headers),
            error=error.openai_error,
        )

    async def _stream(self, call: Call, client: httpx.AsyncClient, slot: _Slot) -> Verdict_:
        """One streaming attempt: reply at the commit point, then wait for the end.

        Before the first content chunk every failure is an ordinary ``Failed`` reply,
        so the router can still retry or fail over. From the first content on, the
        requester reads the rest through a :class:`_Tail`, which ends with exactly one
        ``StreamEnd`` or ``StreamBroken``; this task waits for that (or for
        ``call.scope`` to be cancelled), then drains and closes the response.
        """
        started = trio.current_time()
        timeouts = self.config.timeouts
        upstream = self._translate(call)
        if isinstance(upstream, Failed):
            return _reply(call, upstream)
        request = self._http_request(upstream)
        deadline, own = self._deadline(started, timeouts.attempt, call.deadline)
        response: httpx.Response | None = None
        with trio.move_on_at(deadline):
            try:
                response = await client.send(request, stream=True)
            except UPSTREAM_ERRORS as error:
                return _reply(call, _transport_failure(error, trio.current_time() - started))
        if response is None:
            return _reply(call, _silence(own, "no response headers", trio.current_time() - started))
        try:
            if response.status_code != 200:
                return _reply(call, await self._stream_failure(response, started, deadline, own))
            reader = _StreamReader(response, self._adapter.stream_decoder(call.body), self._redact)
            verdict = await self._commit(call, reader, slot, started)
            if verdict == _SUCCESS:
                # The answer is complete and the attempt settled (by the tail: its
                # requester may already be sending the next request). Reading the body
                # to its end lets the connection go back to the pool instead of being
                # closed; a provider that leaves it open holds only the connection.
                await reader.drain(min(trio.current_time() + DRAIN_SECONDS, call.deadline), DRAIN_BYTES)
            return verdict
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    async def _stream_failure(self, response: httpx.Response, started: float, deadline: float, own: bool) -> Outcome:
        payload = b""
        with trio.move_on_at(deadline):
            try:
                async for piece in response.aiter_bytes():
                    payload += piece
                    if len(payload) > MAX_ERROR_BODY:
                        break
            except UPSTREAM_ERRORS:
                pass  # the status says enough; the body was a courtesy
            return self._failure(response.status_code, response.headers, payload, trio.current_time() - started)
        return _silence(own, "no error body", trio.current_time() - started)

    async def _commit(self, call: Call, reader: _StreamReader, slot: _Slot, started: float) -> Verdict_:
        """Read up to the commit point and reply; then wait for the requester to read the
        rest. Returns the stream's verdict (None: abandoned)."""
        timeouts = self.config.timeouts
        # Before the commit point: hold role-only and empty chunks back. Each read
        # waits at most until the first-token deadline (see _StreamReader.bounded).
        head: list[dict[str, Any]] = []
        deadline, own = self._deadline(trio.current_time(), timeouts.first_token, call.deadline)
        with reader.bounded() as waiting:
            while True:
                item = await reader.next_item(deadline)
                if isinstance(item, StreamBroken):
                    elapsed = trio.current_time() - started
                    return _reply(call, Failed(item.error_class, item.message, elapsed, status=200))
                if isinstance(item, StreamEnd):
                    break
                head.append(item)
                if _has_content(item):
                    break
        if waiting.cancelled_caught:
            silence = _silence(own, "no stream data", trio.current_time() - started)
            return _reply(call, attrs.evolve(silence, status=200))
        # After the commit point the requester reads the rest itself (see _Tail); this
        # task holds the attempt open under call.scope until the stream has ended.
        tail = _Tail(reader, timeouts.idle, call.deadline, call.scope, lambda verdict: self._release(slot, verdict))
        if _reply(call, StreamOpened(tuple(head), tail, trio.current_time() - started)) is None:
            return None
        with trio.move_on_at(call.deadline + STREAM_GRACE):
            await tail.ended.wait()
            return tail.verdict
        tail.expire()
        return None

    @staticmethod
    def _deadline(start: float, timeout: float, request_deadline: float) -> tuple[float, bool]:
        """The deadline of one wait, and whether it is the provider's own timeout.

        When the request's deadline comes first, a timeout is the request's, not a
        sign of the provider's health.
        """
        own = start + timeout
        if own <= request_deadline:
            return own, True
        return request_deadline, False

    # -- accounting -------------------------------------------------------------------

    def _settle(self, verdict: Verdict_, admission: Admission, request_id: str) -> None:
        before = self._breaker
        if verdict is None:
            self._totals["cancelled"] += 1
            self._breaker = before.release(admission)
        elif verdict == _SUCCESS or isinstance(verdict, Completed):
            self._totals[_SUCCESS] += 1
            self._breaker = before.record_success(admission)
        elif isinstance(verdict, Failed | StreamBroken):
            error_class = verdict.error_class
            self._totals[error_class.value] += 1
            if error_class.counts_against_provider:
                self._breaker = before.record_failure(admission, trio.current_time())
            else:
                self._breaker = before.release(admission)
            if error_class is ErrorClass.RATE_LIMITED:
                retry_after = verdict.retry_after if isinstance(verdict, Failed) else None
                self._limit_rate(retry_after)
            elif error_class is ErrorClass.MISCONFIGURED:
                event(logging.ERROR, request_id, "provider_misconfigured",
                      f"provider {self.config.name} refused our credentials or model ({verdict.message}):"
                      " check its configuration", logger=logger, provider=self.config.name)
            self._log_transition(before, request_id, f"{error_class.value}: {verdict.message}")
            return
        self._log_transition(before, request_id)

    def _limit_rate(self, retry_after: float | None) -> None:
        seconds = retry_after if retry_after is not None else self.config.rate_limit_seconds
        until = trio.current_time() + seconds
        if self._rate_limited_until is None or until > self._rate_limited_until:
            self._rate_limited_until = until

    def _log_transition(self, before: Breaker, request_id: str, failure: str | None = None) -> None:
        """Log how the circuit changed, if it did; one that opens on a ``failure`` says
        what the last one was (below WARNING, failed attempts are not logged)."""
        if before is self._breaker:
            return
        change = describe_transition(before, self._breaker)
        if change is not None:
            self._transitions += 1
            if failure is not None and self._breaker.state is CircuitState.OPEN:
                change += f"; last failure: {failure}"
            event(logging.WARNING, request_id, "circuit", f"circuit for {self.config.name} {change}",
                  logger=logger, provider=self.config.name, circuit=self._breaker.state.value)

    def _reset(self, reason: str) -> None:
        # Calls in flight keep their old admissions: the new breaker ignores them as stale.
        epoch = self._breaker.epoch + 1
        if self._breaker.state is not CircuitState.CLOSED:
            self._transitions += 1
        self._breaker = Breaker(self.config.breaker, epoch=epoch)
        self._rate_limited_until = None
        event(logging.WARNING, "-", "circuit", f"circuit for {self.config.name} reset to CLOSED: {reason}",
              logger=logger, provider=self.config.name, circuit="closed")

    def _snapshot(self) -> ProviderSnapshot:
        now = trio.current_time()
        breaker = self._breaker
        return ProviderSnapshot(
            name=self.config.name,
            kind=self.config.kind,
            circuit=breaker.state_at(now).value,
            consecutive_failures=breaker.consecutive_failures,
            open_until=breaker.open_until,
            rate_limited_until=self._rate_limited_until,
            in_flight=len(self._slots),
            max_concurrency=self.config.max_concurrency,
            totals=self._totals_now(),
            circuit_transitions=self._transitions,
        )

    def _totals_now(self) -> dict[str, int]:
        totals = dict(self._totals)
        replaced = self._pool.connections_replaced() if self._pool is not None else 0
        if replaced:  # the provider's kept-alive connections closed under requests: no failure
            totals["connections_replaced"] = replaced
        return totals

    def _close_inbox(self) -> None:
        """Answer every queued call with a closed reply channel, then refuse new ones."""
        self._inbox_send.close()
        while True:
            try:
                message = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            message.reply.close()
        self._inbox.close()
        self._waiting.clear()


# The name trio gives each attempt's task (formatted once, not at every spawn: about 80
# bytes a request in flight).
_ATTEMPT_TASK_NAME = f"{__name__}.{ProviderActor._attempt.__qualname__}"


@attrs.define(eq=False)
class _Slot:
    """An admitted attempt's hold on its provider: given back by ``ProviderActor._release``."""

    admission: Admission
    #: The call while the slot is held; None once it is given back.
    call: Call | None
    #: While the attempt waits under a deadline on ``call.scope``: what it waits for,
    #: whether the deadline is the provider's own timeout, when it started, the deadline.
    silence: tuple[str, bool, float, float] | None = None


async def _close_stale_connections(pool: ClientPool, scope: trio.CancelScope) -> None:
    """Every ``KEEPALIVE_EXPIRY`` seconds, close the pool's idle connections that will
    not be reused (``ClientPool.close_stale``): after a burst, a provider that has gone
    quiet would otherwise keep its peak's connections, and their file descriptors, for
    as long as it stays quiet. Runs until ``scope`` is cancelled."""
    with scope:
        while True:
            await trio.sleep(KEEPALIVE_EXPIRY)
            pool.close_stale()


class _StreamReader:
    """Reads an upstream event stream item by item, each read under a deadline.

    ``next_item`` never raises for upstream trouble: it returns an OpenAI chunk, a
    ``StreamEnd`` once the stream finished properly, or a ``StreamBroken`` saying why
    it did not -- except silence: past its deadline it is cancelled, and the
    ``bounded()`` block it runs in ends with ``cancelled_caught`` set. Before the
    commit point the reads share one block, its deadline moved on each read, rather
    than a scope per read (entering and leaving cancel scopes cost a sixth of the
    gateway's CPU for a stream); after it, only a read that must wait for the network
    has a block of its own (see :class:`_Tail`).

    Events are decoded into chunks one at a time, as they are asked for: a read often
    brings a whole stream, and its events' text is a third of the size of the chunks
    it decodes to (what a gateway with hundreds of streams in flight holds). Both
    queues are kept in reverse, so that taking the next one is a ``pop()``; they only
    ever fill up when empty.

    ``redact`` masks the provider's key in the text of an event that breaks the
    stream: an error event's message reaches the client and the log.
    """

    def __init__(self, response: httpx.Response, decoder: StreamDecoder, redact: Redactor) -> None:
        self._bytes = body_pieces(response)
        self._sse = SSEDecoder()
        self._decoder = decoder
        self._redact = redact
        self._events: list[ServerSentEvent] = []
        self._ready: list[dict[str, Any]] = []
        self._ended = False
        self._broken: StreamBroken | None = None
        self._waiting: trio.CancelScope | None = None

    def bounded(self) -> trio.CancelScope:
        """A cancel scope for one or more ``next_item`` calls (enter it around them)."""
        self._waiting = trio.CancelScope()
        return self._waiting

    def ready_item(self) -> StreamItem | None:
        """The next item if it needs no read: a chunk of an event already received, or
        the stream's ending; None if only the network can tell."""
        decoder = self._decoder
        while not self._ready:
            if self._events:
                self._decode(self._events.pop())
                continue
            if self._broken is not None:
                return self._broken
            if self._ended or _finished(decoder):
                return StreamEnd(decoder.finish_reason, decoder.usage)
            return None
        return self._ready.pop()

    async def next_item(self, deadline: float) -> StreamItem:
        """The next item; waits for data until ``deadline`` at most (see the class).

        A failure comes in its place in the stream: the chunks that arrived before a
        chunk that cannot be read or an error event, in the same read, come first. (A
        line the event-stream framing itself rejects -- not UTF-8, or over the size
        limit -- fails its read as a whole.)
        """
        while (item := self.ready_item()) is None:
            assert self._waiting is not None, "next_item runs inside a bounded() block"
            self._waiting.deadline = deadline
            try:
                data = await self._bytes.__anext__()
            except StopAsyncIteration:
                self._ended = True
                if self._decoder.finish_reason is None:  # else: a clean end without [DONE]
                    self._broken = StreamBroken(ErrorClass.TRANSIENT, "the provider's stream ended without finishing")
                continue
            except UPSTREAM_ERRORS as error:
                error_class, description = classify_exception(error)
                self._broken = StreamBroken(error_class, f"the provider's stream broke: {description}")
                continue
            try:
                self._events = self._sse.feed(data)[::-1]
            except MalformedStream as error:
                self._broken = StreamBroken(ErrorClass.MALFORMED, f"malformed stream from the provider: {error}")
        return item

    def _decode(self, sse_event: ServerSentEvent) -> None:
        """Decode one event into ``_ready``, or note in ``_broken`` how it broke the
        stream (the events after it are dropped)."""
        try:
            self._ready = self._decoder.feed(sse_event)[::-1]
            return
        except MalformedStream as error:  # its text can quote the event
            broken = StreamBroken(ErrorClass.MALFORMED,
                                  f"malformed stream from the provider: {self._redact.text(str(error))}")
        except ProviderStreamError as error:
            reported = error.error
            error_class = classify_response(reported.status or 500, code=reported.code, message=reported.message)
            broken = StreamBroken(error_class,
                                  f"the provider reported an error mid-stream: {self._redact.text(reported.message)}")
        except Exception:  # a chunk our decoder chokes on is a malformed chunk
            logger.exception("a stream chunk the adapter could not read")
            broken = StreamBroken(ErrorClass.MALFORMED, "a stream chunk the gateway could not read")
        self._events.clear()
        self._broken = broken

    async def drain(self, deadline: float, limit: int) -> None:
        """Read what is left of the body, up to ``limit`` bytes, until ``deadline``.

        Returns early (leaving the rest unread) past either bound or on any transport
        error: the caller then closes the response, and with it the connection.
        """
        with trio.move_on_at(deadline):
            try:
                async for data in self._bytes:
                    limit -= len(data)
                    if limit < 0:
                        return
            except UPSTREAM_ERRORS:
                return


class _Tail:
    """The rest of a committed stream (``StreamOpened.chunks``), read by the requester.

    After the commit point the requester reads the upstream response itself, in its
    own task: no task in between and no chunk decoded before it is asked for, so a
    requester slower than its provider leaves the provider's bytes in the kernel's
    socket buffers (TCP's flow control holds the provider back) instead of in ours.
    Each ``receive`` that must wait for the network waits at most until the idle
    deadline -- the provider's idle timeout from when it is asked, capped by the
    request's deadline -- and silence past it ends the stream with a ``StreamBroken``.

    The ending, ``StreamEnd`` or ``StreamBroken``, is the attempt's verdict: ``settle``
    (the actor's accounting, synchronous) runs the moment the requester reads it, so
    the provider's slot is free before the requester can make its next call; then
    ``ended`` wakes the attempt's task, which drains and closes the response.

    The attempt is abandoned (settled as neither success nor failure, its ``scope``
    cancelled, which closes the response) when the tail is closed before its ending;
    when a read is cancelled while it waits for the network (the response cannot be
    read on from the middle of a read: the next ``receive`` gives a ``StreamBroken``,
    after which the router may continue the answer elsewhere); and when the attempt
    gives up on a requester that has not read the ending ``STREAM_GRACE`` seconds past
    the request's deadline (every read ends by then: a requester that is not reading
    has stopped, and must not hold the provider's slot and connection for ever).
    """

    def __init__(
        self,
        reader: _StreamReader,
        idle: float,
        deadline: float,
        scope: trio.CancelScope,
        settle: Callable[[Verdict_], None],
    ) -> None:
        # Not the Call itself: its reply holds the StreamOpened that holds this tail,
        # and that cycle would leave every stream to the cyclic garbage collector.
        self._reader = reader
        self._idle = idle
        self._deadline = deadline
        self._scope = scope
        self._settle = settle
        self._closed = False
        #: The ending to give instead of reading on, once the attempt is abandoned.
        self._lost: StreamBroken | None = None
        self.ended = trio.Event()
        self.verdict: Verdict_ = None

    async def receive(self) -> StreamItem:
        """The next chunk, or the ending; waits for the network only when it must.

        Always a checkpoint, before anything is taken (as a channel's ``receive``):
        reads of a provider that sends faster than its client is served never wait,
        and must not keep every other task waiting instead.
        """
        await trio.lowlevel.checkpoint()
        item = self._ready_item()
        if item is None:
            deadline, own = ProviderActor._deadline(trio.current_time(), self._idle, self._deadline)
            waiting = self._reader.bounded()
            try:
                with waiting:
                    item = await self._reader.next_item(deadline)
            finally:
                if item is None and not waiting.cancelled_caught:  # stopped from outside mid-read
                    self._abandon(StreamBroken(ErrorClass.TRANSIENT, "a read of the stream was cancelled midway"))
            if waiting.cancelled_caught:
                silence = _silence(own, "no stream data", 0.0)
                item = StreamBroken(silence.error_class, silence.message)
        return self._deliver(item)

    def receive_nowait(self) -> StreamItem:
        """A chunk or the ending already at hand; ``trio.WouldBlock`` otherwise."""
        item = self._ready_item()
        if item is None:
            raise trio.WouldBlock
        return self._deliver(item)

    def close(self) -> None:
        """Stop reading; before the ending, abandon the attempt (never blocks)."""
        self._closed = True
        if not self.ended.is_set():
            self._abandon(None)

    def expire(self) -> None:
        """The attempt gives up on its requester (see the class); only the attempt calls it."""
        self._abandon(StreamBroken(ErrorClass.DEADLINE,
                                   "the request's deadline passed before the stream was read to its end"))

    def __aiter__(self) -> _Tail:
        return self

    async def __anext__(self) -> StreamItem:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _ready_item(self) -> StreamItem | None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self.ended.is_set():
            raise trio.EndOfChannel
        if self._lost is not None:
            return self._lost
        return self._reader.ready_item()

    def _deliver(self, item: StreamItem) -> StreamItem:
        if not isinstance(item, dict):
            self.verdict = _SUCCESS if isinstance(item, StreamEnd) else item
            self._settle(self.verdict)
            self.ended.set()
        return item

    def _abandon(self, ending: StreamBroken | None) -> None:
        if self._lost is None:
            self._lost = ending
            self._settle(None)
            self._scope.cancel()


def _finished(decoder: StreamDecoder) -> bool:
    # OpenAI sends usage after the last finish_reason, so both together mean the answer
    # is complete even if [DONE] never comes; Anthropic's message_delta carries both.
    return decoder.done or (decoder.finish_reason is not None and decoder.usage is not None)


#: Sent with every upstream request, as httpx's client would have sent them.
_DEFAULT_HEADERS = (
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"user-agent", b"orchestrator"),
)


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices", ()):
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or delta.get("function_call") or delta.get("refusal"):
            return True
    return False


def _silence(own_timeout: bool, what: str, elapsed: float) -> Failed:
    if own_timeout:
        return Failed(ErrorClass.SILENT, f"{what} within the provider's timeout", elapsed)
    return Failed(ErrorClass.DEADLINE, f"{what} before the request's deadline", elapsed)


def _transport_failure(error: httpx.TransportError | httpx.DecodingError, elapsed: float) -> Failed:
    error_class, description = classify_exception(error)
    return Failed(error_class, description, elapsed)


def _reply(call: Call, outcome: Outcome) -> Outcome | None:
    """Send the one reply; return it, or None if the requester is gone (abandoned)."""
    try:
        call.reply.send_nowait(outcome)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        return None
    return outcome
