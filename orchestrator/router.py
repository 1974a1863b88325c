"""The router: one request's journey through its deployments, by messaging actors.

For each request the router runs in the request's own task (an HTTP handler or
an embedding caller), so a client that disconnects or a deadline that expires
cancels it structurally, and with it the upstream call: the router owns each
call's cancel scope and cancels it whenever it stops waiting. It keeps no
per-provider state; it asks the actors, whose replies say what happened.

What it does with each outcome (DESIGN section 3)::

    transient / server error / malformed   retry the same provider after a backoff wait
                                           (Retry-After if given), up to max_attempts,
                                           then fail over
    silent (no answer in the timeout)      fail over at once; retried only on the last
                                           deployment
    rate limited (429, or refused)         fail over at once; when every deployment is
                                           rate limited, wait for the earliest to clear
                                           if that fits the deadline, else 429
    too long / unsupported / misconfigured fail over, no retry
    client error                           stop: the provider's error goes to the client
    circuit open / saturated (refused)     fail over; nothing left: 503 + Retry-After

One deadline covers the whole journey: every timeout is capped by it, and a wait
that does not fit in it is not started.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from orchestrator.backoff import backoff_delay
from orchestrator.config import Config, Deployment, RetryPolicy, Route
from orchestrator.errors import (
    AllProvidersFailed,
    Attempt,
    DeadlineExceeded,
    GatewayError,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamClientError,
)
from orchestrator.logs import enabled, event
from orchestrator.messages import (
    Call,
    Completed,
    ErrorClass,
    Failed,
    Outcome,
    Refused,
    Reply,
    RefusalReason,
    StreamOpened,
)
from orchestrator.validation import ChatRequest
from providers.actor import ActorHandle, ActorStopped

__all__ = ["Journey", "Router", "describe_failure"]

INFO = logging.INFO
#: Extra time the router waits for an actor's reply past the request's deadline: the
#: actor enforces the deadline itself and reports it, this only guards against a wedge.
REPLY_GRACE = 0.5
#: Shortest wait between two rounds over rate-limited deployments (a Retry-After of 0
#: must not turn into a busy loop against the provider).
MIN_RATE_LIMIT_WAIT = 0.25
#: Model names whose route is remembered (names are client input: the cache is bounded).
ROUTE_CACHE_SIZE = 4096
#: Retry-After advertised when nothing better is known.
DEFAULT_RETRY_AFTER = 1


class Journey:
    """What happened to one request: its id, its deadline and every attempt.

    Shared by the router (which records attempts) and the service (which reports
    them in headers, error bodies and the final log line).
    """

    __slots__ = ("request_id", "started", "deadline", "attempts", "network_attempts", "provider", "model", "client")

    def __init__(self, request_id: str, *, started: float, deadline: float) -> None:
        self.request_id = request_id
        self.started = started
        self.deadline = deadline
        self.attempts: list[Attempt] = []
        self.network_attempts = 0
        self.provider: str | None = None
        self.model: str | None = None
        #: A short, non-reversible id of the client key that sent the request, if any.
        self.client: str | None = None

    def remaining(self) -> float:
        return self.deadline - trio.current_time()


@attrs.frozen(eq=False)
class Opened:
    """A successful attempt: the answer (or the start of the stream) and its call scope."""

    outcome: Completed | StreamOpened
    deployment: Deployment
    scope: trio.CancelScope


class _Round:
    """What one pass over the deployments ran into, to choose the final error."""

    def __init__(self) -> None:
        self.rate_limited: list[float] = []
        self.unavailable: list[float | None] = []
        self.failures: list[Failed] = []
        self.too_long: Failed | None = None
        #: The wait before a retry that would have passed the deadline, when one did.
        self.wait_past_deadline: float | None = None
        #: ... and whether the provider asked for it (``Retry-After``).
        self.wait_asked = False


class Router:
    """Routes validated requests over the deployments of their model's route."""

    def __init__(self, config: Config, actors: Mapping[str, ActorHandle], *, rng: random.Random) -> None:
        self._config = config
        self._actors = actors
        self._rng = rng
        self._routes: dict[str, Route] = {}

    def route(self, model: str) -> Route:
        """The route for ``model``; raises :class:`ModelNotFound` before any provider call."""
        route = self._routes.get(model)
        if route is None:
            route = self._config.route_for(model)
            if route is None:
                raise ModelNotFound(
                    f"The model '{model}' does not exist or is not routed by this gateway.", param="model"
                )
            if len(self._routes) < ROUTE_CACHE_SIZE:  # only hits are cached, and boundedly
                self._routes[model] = route
        return route

    async def run(
        self,
        request: ChatRequest,
        journey: Journey,
        *,
        body: dict[str, Any] | None = None,
        deployments: Sequence[Deployment] | None = None,
    ) -> Opened:
        """Try the deployments until one answers (or, streaming, produces content).

        ``body`` and ``deployments`` override the request's own (a continuation asks
        only the deployments that take a prefill, with the prefill in the body).
        Raises a :class:`GatewayError` when nothing succeeds. Cancelling the caller
        cancels the upstream call in flight.
        """
        route = self.route(request.model)
        policy = self._config.retry_for(route)
        deployments = route.deployments if deployments is None else deployments
        body = request.body if body is None else body
        # Rounds over the deployments: another one only after waiting out rate limits,
        # for as long as the wait fits the deadline (each wait is at least
        # MIN_RATE_LIMIT_WAIT, so the deadline ends the loop).
        while True:
            tally = _Round()
            opened = await self._round(request, body, journey, deployments, policy, tally)
            if opened is not None:
                return opened
            wait = self._rate_limit_wait(tally, journey)
            if wait is None:
                raise self._final_error(tally, journey)
            event(INFO, journey.request_id, "rate_limit_wait",
                  f"every deployment is rate limited: waiting {wait:.2f}s for the earliest to clear",
                  wait_seconds=round(wait, 3))
            await trio.sleep(wait)

    async def _round(
        self,
        request: ChatRequest,
        body: dict[str, Any],
        journey: Journey,
        deployments: Sequence[Deployment],
        policy: RetryPolicy,
        tally: _Round,
    ) -> Opened | None:
        request_id = journey.request_id
        count = len(deployments)
        for index, deployment in enumerate(deployments):
            is_last = index == count - 1
            model = deployment.upstream_model(request.model)
            upstream_body = {**body, "model": model}
            retries = 0
            while True:
                if journey.remaining() <= 0:
                    raise self._deadline_error(journey)
                outcome, scope = await self._attempt(deployment.provider, upstream_body, request.stream, journey)
                if isinstance(outcome, Completed | StreamOpened):
                    self._record(journey, deployment.provider, model, "ok", outcome.elapsed, status=200)
                    journey.provider, journey.model = deployment.provider, model
                    return Opened(outcome, deployment, scope)
                if isinstance(outcome, Refused):
                    self._skip(journey, deployment.provider, model, outcome, tally)
                    break
                label = describe_failure(outcome)
                self._record(journey, deployment.provider, model, label, outcome.elapsed, status=outcome.status)
                error_class = outcome.error_class
                if error_class is ErrorClass.CLIENT_ERROR:
                    raise UpstreamClientError(
                        outcome.message,
                        status=outcome.status or 400,
                        error=outcome.error,
                        attempts=tuple(journey.attempts),
                        request_id=request_id,
                    )
                if error_class is ErrorClass.DEADLINE:
                    raise self._deadline_error(journey)
                if error_class is ErrorClass.RATE_LIMITED:
                    tally.rate_limited.append(
                        outcome.retry_after
                        if outcome.retry_after is not None
                        else self._config.provider(deployment.provider).rate_limit_seconds
                    )
                    self._failover(journey, deployments, index, label)
                    break
                if error_class in (ErrorClass.TOO_LONG, ErrorClass.UNSUPPORTED):
                    tally.too_long = outcome
                    self._failover(journey, deployments, index, label)
                    break
                tally.failures.append(outcome)
                if error_class is ErrorClass.MISCONFIGURED or (error_class is ErrorClass.SILENT and not is_last):
                    self._failover(journey, deployments, index, label)
                    break
                # Transient, server error, malformed, or silence on the last deployment.
                retries += 1
                if retries >= policy.max_attempts:
                    self._failover(journey, deployments, index, f"{label}, {retries} attempts")
                    break
                wait = outcome.retry_after if outcome.retry_after is not None else backoff_delay(
                    retries, policy, self._rng
                )
                if wait >= journey.remaining():
                    tally.wait_past_deadline = wait
                    tally.wait_asked = outcome.retry_after is not None
                    event(INFO, request_id, "backoff_skipped",
                          f"backoff: a {wait:.2f}s wait would pass the deadline ({journey.remaining():.2f}s left)",
                          wait_seconds=round(wait, 3))
                    self._failover(journey, deployments, index, f"{label}, no time to retry")
                    break
                event(INFO, request_id, "backoff",
                      f"backoff: waiting {wait:.2f}s before attempt {journey.network_attempts + 1}"
                      f" to {deployment.provider}",
                      provider=deployment.provider, wait_seconds=round(wait, 3), retry=retries)
                await trio.sleep(wait)
        return None

    async def _attempt(
        self, provider: str, body: dict[str, Any], stream: bool, journey: Journey
    ) -> tuple[Outcome, trio.CancelScope]:
        """One message to one actor, and its reply. Cancels the call unless it opened a stream."""
        actor = self._actors[provider]
        scope = trio.CancelScope()
        reply: Reply[Outcome] = Reply()
        call = Call(journey.request_id, body, stream, journey.deadline, scope, reply)
        keep_scope = False
        try:
            try:
                if not actor.submit(call):
                    return Refused(RefusalReason.SATURATED), scope
            except ActorStopped as error:
                raise ServiceUnavailable(
                    str(error), retry_after=DEFAULT_RETRY_AFTER, request_id=journey.request_id
                ) from None
            outcome: Outcome | None = None
            with trio.move_on_at(journey.deadline + REPLY_GRACE):
                try:
                    outcome = await reply.receive()
                except trio.EndOfChannel:
                    raise ServiceUnavailable(
                        f"the actor for provider {provider!r} stopped",
                        retry_after=DEFAULT_RETRY_AFTER,
                        request_id=journey.request_id,
                    ) from None
            if outcome is None:
                raise self._deadline_error(journey)
            # A non-streaming attempt replies as its last act, with no checkpoint after
            # (``ProviderActor._attempt``): by the time its reply is read here, its task
            # has left the scope, so cancelling it would change nothing. It would cost
            # about 2% of the gateway's CPU per json request: trio formats the
            # cancelling task's repr at every cancel.
            keep_scope = isinstance(outcome, StreamOpened) or not stream
            return outcome, scope
        finally:
            reply.abandon()  # a reply arriving after this is the actor's to clean up
            if not keep_scope:
                scope.cancel()

    # -- journey records ----------------------------------------------------------

    def _record(
        self, journey: Journey, provider: str, model: str, outcome: str, elapsed: float, *, status: int | None
    ) -> None:
        journey.network_attempts += 1
        number = journey.network_attempts
        journey.attempts.append(Attempt(number, provider, model, outcome, elapsed, status))
        if not enabled(INFO):
            return
        status_text = f" ({status})" if status is not None and outcome != "ok" else ""
        event(INFO, journey.request_id, "attempt",
              f"attempt {number} to {provider} ({model}): {outcome}{status_text} after {elapsed:.3f}s",
              attempt=number, provider=provider, model=model, outcome=outcome, status=status,
              elapsed_ms=round(elapsed * 1000, 1))

    def _skip(self, journey: Journey, provider: str, model: str, refused: Refused, tally: _Round) -> None:
        reason = refused.reason
        journey.attempts.append(Attempt(None, provider, model, reason.value, 0.0))
        if reason is RefusalReason.RATE_LIMITED:
            tally.rate_limited.append(refused.retry_after or 0.0)
        else:
            tally.unavailable.append(refused.retry_after)
        clears = f", clears in {refused.retry_after:.1f}s" if refused.retry_after else ""
        event(INFO, journey.request_id, "skip",
              f"skipping {provider} without a call: {reason.value.replace('_', ' ')}{clears}",
              provider=provider, reason=reason.value)

    @staticmethod
    def _failover(journey: Journey, deployments: Sequence[Deployment], index: int, reason: str) -> None:
        if index + 1 < len(deployments):
            source, target = deployments[index].provider, deployments[index + 1].provider
            event(INFO, journey.request_id, "failover", f"failover {source} -> {target}: {reason}",
                  source=source, target=target, reason=reason)

    # -- when nothing succeeded ---------------------------------------------------

    @staticmethod
    def _rate_limit_wait(tally: _Round, journey: Journey) -> float | None:
        """The wait before another round, when only rate limits stood in the way."""
        if not tally.rate_limited or tally.failures or tally.too_long is not None:
            return None
        wait = max(min(tally.rate_limited), MIN_RATE_LIMIT_WAIT)
        return wait if wait < journey.remaining() else None

    def _final_error(self, tally: _Round, journey: Journey) -> GatewayError:
        attempts = tuple(journey.attempts)
        request_id = journey.request_id
        if tally.wait_past_deadline is not None:
            return self._deadline_error(journey, tally)
        if not tally.failures and tally.too_long is not None:
            failed = tally.too_long
            return UpstreamClientError(
                failed.message, status=400, error=failed.error, attempts=attempts, request_id=request_id
            )
        if not tally.failures and tally.unavailable:
            hints = [seconds for seconds in [*tally.unavailable, *tally.rate_limited] if seconds]
            return ServiceUnavailable(
                "No provider can take this request now: "
                + ", ".join(sorted({attempt.outcome.replace("_", " ") for attempt in attempts if attempt.number is None}))
                + ".",
                retry_after=_whole_seconds(min(hints)) if hints else DEFAULT_RETRY_AFTER,
                attempts=attempts,
                request_id=request_id,
            )
        if not tally.failures and tally.rate_limited:
            return RateLimited(
                "Every provider for this model is rate limited; retry after the time given.",
                retry_after=_whole_seconds(min(tally.rate_limited)),
                attempts=attempts,
                request_id=request_id,
            )
        last = tally.failures[-1] if tally.failures else None
        detail = f" The last: {describe_failure(last)}: {last.message}" if last is not None else ""
        return AllProvidersFailed(
            f"Every provider for this model failed after {journey.network_attempts} attempts.{detail}",
            attempts=attempts,
            request_id=request_id,
        )

    @staticmethod
    def _deadline_error(journey: Journey, tally: _Round | None = None) -> DeadlineExceeded:
        """The deadline ran out, or (``tally`` given) left too little for a retry's wait.

        A provider's own ``Retry-After`` that did not fit is passed on: the client learns
        when it may be worth asking again."""
        budget = journey.deadline - journey.started
        count = journey.network_attempts
        attempts = f"{count} attempt{'' if count == 1 else 's'}"
        retry_after = None
        if tally is None or tally.wait_past_deadline is None:
            message = f"The request's deadline of {budget:g}s was spent after {attempts}."
        else:
            wait = tally.wait_past_deadline
            message = (f"The request's deadline of {budget:g}s had {max(journey.remaining(), 0):.2f}s left after"
                       f" {attempts}: too little for the {wait:.2f}s wait before another"
                       + (" that the provider asked for." if tally.wait_asked else "."))
            retry_after = math.ceil(wait) if tally.wait_asked else None
        return DeadlineExceeded(message, attempts=tuple(journey.attempts), retry_after=retry_after,
                                request_id=journey.request_id)


def describe_failure(failed: Failed) -> str:
    """The short name of a failure, as logs and attempt lists show it."""
    error_class = failed.error_class
    if error_class is ErrorClass.SILENT or failed.status in (408, 504):
        return "timeout"
    if error_class is ErrorClass.TRANSIENT and failed.status is None:
        return "connection_error"
    if error_class is ErrorClass.TRANSIENT and failed.status == 200:
        return "stream_cut"  # the stream began, then ended before its first content
    return _LABELS.get(error_class, error_class.value)


_LABELS = {
    ErrorClass.RATE_LIMITED: "rate_limit",
    ErrorClass.SERVER_ERROR: "server_error",
    ErrorClass.MALFORMED: "malformed_response",
    ErrorClass.TOO_LONG: "context_length_exceeded",
}


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))
