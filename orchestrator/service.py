"""The service: provider actors in one nursery, and the handle callers use.

This is the embedding API; the HTTP app is a thin layer over the same handle::

    async with open_orchestrator(Config.default()) as gw:
        completion = await gw.chat_completion({"model": "gpt-4", "messages": [...]})
        print(completion.body["choices"][0]["message"]["content"], completion.provider)

        async with gw.stream_chat_completion({"model": "gpt-4", "messages": [...]}) as chunks:
            async for chunk in chunks:
                ...

Every method validates the request first, then routes it in the caller's own task:
cancelling the caller cancels the upstream call. Failures raise the documented
:class:`~orchestrator.errors.GatewayError` subclasses.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import trio

from orchestrator.config import Config
from orchestrator.errors import Attempt, GatewayError, InvalidRequest, ServiceUnavailable
from orchestrator.logs import enabled, event
from orchestrator.router import Journey, Router
from orchestrator.streaming import ChunkStream
from orchestrator.validation import ChatRequest, validate_chat_request
from providers.actor import ActorHandle, ProviderActor

__all__ = ["Completion", "Orchestrator", "new_request_id", "open_orchestrator", "sane_request_id"]

INFO = logging.INFO
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


def new_request_id() -> str:
    return "req_" + os.urandom(8).hex()


def sane_request_id(candidate: str | None) -> str:
    """The client's request id if it is sane (short, printable, no spaces), else a new one."""
    if candidate and _SANE_REQUEST_ID.fullmatch(candidate):
        return candidate
    return new_request_id()


@attrs.frozen
class Completion:
    """A non-streaming answer: OpenAI's ``chat.completion`` body and how it was obtained."""

    body: dict[str, Any]
    request_id: str
    provider: str
    model: str
    attempts: tuple[Attempt, ...]


class Orchestrator:
    """The gateway's handle: routes chat completions over the configured providers.

    Get one from :func:`open_orchestrator`. Safe to share between any number of
    tasks of the trio run that opened it.
    """

    def __init__(self, config: Config, actors: Mapping[str, ActorHandle]) -> None:
        self.config = config
        self._actors = actors
        self._router = Router(config, actors, rng=random.Random(config.seed))
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- chat completions ---------------------------------------------------------

    async def chat_completion(
        self,
        request: Mapping[str, Any] | ChatRequest,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        client: str | None = None,
    ) -> Completion:
        """Answer a non-streaming chat-completions request.

        ``timeout`` lowers the configured deadline for this request; ``client`` is a
        short id of the caller for the logs (never a key). Blocks for the
        whole journey (attempts, backoff waits, failovers), never past the deadline.
        Raises :class:`~orchestrator.errors.GatewayError` subclasses. Cancelling it
        cancels the upstream call and logs the journey's last line.
        """
        journey = self._start(request_id, timeout, client)
        try:
            chat = self._validate(request, stream=False)
            self._accept(chat, journey)
            try:
                opened = await self._router.run(chat, journey)
            finally:
                self._in_flight -= 1
        except GatewayError as error:
            self._log_failure(journey, error)
            raise
        except trio.Cancelled as cancelled:
            _log_cancelled(journey, "request", cancelled)
            raise
        body = opened.outcome.completion  # type: ignore[union-attr]
        self._log_success(journey, 200)
        return Completion(body, journey.request_id, opened.deployment.provider,
                          body.get("model") or journey.model or chat.model, tuple(journey.attempts))

    async def open_stream(
        self,
        request: Mapping[str, Any] | ChatRequest,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        client: str | None = None,
    ) -> ChunkStream:
        """Route a streaming request up to its commit point and return its chunks.

        Returns once the first content chunk exists (retries and failovers before that
        are invisible); raises a :class:`GatewayError` if no deployment got that far.
        The caller must :meth:`ChunkStream.close` the stream; prefer
        :meth:`stream_chat_completion`, which does.
        """
        journey = self._start(request_id, timeout, client)
        try:
            chat = self._validate(request, stream=True)
            self._accept(chat, journey)
            opened = None
            try:
                opened = await self._router.run(chat, journey)
            finally:
                if opened is None:  # failed or cancelled: no stream holds the slot
                    self._in_flight -= 1
        except GatewayError as error:
            self._log_failure(journey, error)
            raise
        except trio.Cancelled as cancelled:
            _log_cancelled(journey, "request", cancelled)
            raise
        stream = None
        try:
            if enabled(INFO):
                event(INFO, journey.request_id, "stream_committed",
                      f"streaming from {opened.deployment.provider} after {journey.network_attempts} attempts",
                      provider=opened.deployment.provider)
            stream = _CountedChunkStream(self, router=self._router, request=chat, journey=journey, opened=opened)
            return stream
        finally:
            if stream is None:  # no stream to close it: give the call and the slot back here
                opened.outcome.chunks.close()  # type: ignore[union-attr]
                opened.scope.cancel()
                self._in_flight -= 1

    @asynccontextmanager
    async def stream_chat_completion(
        self,
        request: Mapping[str, Any] | ChatRequest,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        client: str | None = None,
    ) -> AsyncIterator[ChunkStream]:
        """``async with gw.stream_chat_completion(req) as chunks: async for chunk in chunks``.

        Entering blocks until the commit point (or raises); iterating raises
        :class:`~orchestrator.errors.StreamInterrupted` if the answer breaks and cannot
        be continued; leaving the block early cancels the upstream call.
        """
        stream = await self.open_stream(request, request_id=request_id, timeout=timeout, client=client)
        try:
            yield stream
        finally:
            stream.close()

    # -- state ---------------------------------------------------------------------

    async def reset_provider(self, name: str, *, reason: str) -> dict[str, Any]:
        """Close ``name``'s circuit and clear its rate limit (an admin action).

        Raises ``KeyError`` for an unknown provider.
        """
        snapshot = await self._actors[name].reset(reason)
        return snapshot.as_json(trio.current_time())

    async def health(self) -> dict[str, Any]:
        """Every provider's circuit, rate-limit state and load, from its actor."""
        now = trio.current_time()
        providers = {}
        for name, actor in self._actors.items():
            snapshot = await actor.snapshot()
            providers[name] = snapshot.as_json(now)
        return {
            "status": "healthy",
            # With --workers each process answers for itself: say which one did.
            "worker_pid": os.getpid(),
            "in_flight": self._in_flight,
            "max_in_flight": self.config.max_in_flight,
            "providers": providers,
        }

    def models(self) -> list[dict[str, Any]]:
        """The routed models in OpenAI's model-list shape (glob routes marked as patterns)."""
        return [
            {
                "id": route.match,
                "object": "model",
                "created": 0,
                "owned_by": "orchestrator",
                "pattern": any(char in route.match for char in "*?["),
                "providers": [deployment.provider for deployment in route.deployments],
            }
            for route in self.config.routes
        ]

    # -- internals -------------------------------------------------------------------

    def _start(self, request_id: str | None, timeout: float | None, client: str | None) -> Journey:
        now = trio.current_time()
        budget = self.config.deadline if timeout is None else min(timeout, self.config.deadline)
        journey = Journey(sane_request_id(request_id), started=now, deadline=now + budget)
        journey.client = client
        return journey

    def _validate(self, request: Mapping[str, Any] | ChatRequest, *, stream: bool) -> ChatRequest:
        chat = request if isinstance(request, ChatRequest) else validate_chat_request(request)
        if chat.stream != stream:
            if stream:
                chat = attrs.evolve(chat, stream=True)
            else:
                raise InvalidRequest(
                    "stream is true: use the streaming call (stream_chat_completion) for a streamed answer.",
                    param="stream",
                )
        self._router.route(chat.model)  # an unrouted model fails here, before any call
        return chat

    def _accept(self, chat: ChatRequest, journey: Journey) -> None:
        if self._in_flight >= self.config.max_in_flight:
            raise ServiceUnavailable(
                f"The gateway is at its limit of {self.config.max_in_flight} requests in flight; retry shortly.",
                retry_after=1,
            )
        self._in_flight += 1
        if not enabled(INFO):
            return
        client = f" client={journey.client}" if journey.client else ""
        event(INFO, journey.request_id, "accepted",
              f"request accepted: model={chat.model} stream={str(chat.stream).lower()}"
              f" deadline={journey.deadline - journey.started:g}s{client}",
              model=chat.model, stream=chat.stream, client=journey.client)

    def _log_success(self, journey: Journey, status: int) -> None:
        if not enabled(INFO):
            return
        elapsed = trio.current_time() - journey.started
        attempts = journey.network_attempts
        event(INFO, journey.request_id, "done",
              f"{status} from {journey.provider} ({journey.model}) after {attempts}"
              f" attempt{'s' if attempts != 1 else ''} in {elapsed:.3f}s",
              status=status, provider=journey.provider, attempts=attempts, elapsed_ms=round(elapsed * 1000, 1))

    def _log_failure(self, journey: Journey, error: GatewayError) -> None:
        if error.request_id is None:
            error.request_id = journey.request_id
        if not error.attempts and journey.attempts:
            error.attempts = tuple(journey.attempts)
        elapsed = trio.current_time() - journey.started
        level = INFO if error.status < 500 else logging.WARNING
        event(level, journey.request_id, "done",
              f"{error.status} {error.code or error.error_type}: {error.message}"
              f" ({journey.network_attempts} attempts in {elapsed:.3f}s)",
              status=error.status, code=error.code, attempts=journey.network_attempts,
              elapsed_ms=round(elapsed * 1000, 1))


#: Why a journey was cancelled when nothing says more: an explicit cancel is the
#: client's leaving (its HTTP handler's scope) or the gateway stopping (a nursery's),
#: which the service cannot tell apart.
_CANCELLED = "the client left or the gateway is stopping"
#: ... and when a deadline its caller set around it passed (``move_on_after``, ...).
_CALLER_DEADLINE = "a deadline its caller set passed"


def _log_cancelled(journey: Journey, what: str, cancelled: trio.Cancelled | None = None) -> None:
    """Log a cancelled journey's last line: without it, the log of a request the
    client gave up on would end at "request accepted". ``what`` is what was
    cancelled ("request", or the stream's state)."""
    if not enabled(INFO):
        return
    elapsed = trio.current_time() - journey.started
    attempts = journey.network_attempts
    # Recent trio says what cancelled it (getattr: older versions do not): a reason,
    # if the canceller gave one, and whether it was a deadline.
    why = getattr(cancelled, "reason", None) or (
        _CALLER_DEADLINE if getattr(cancelled, "source", None) == "deadline" else _CANCELLED)
    event(INFO, journey.request_id, "cancelled",
          f"{what} cancelled after {elapsed:.3f}s and {attempts} attempt{'s' if attempts != 1 else ''}: {why}",
          provider=journey.provider, attempts=attempts, elapsed_ms=round(elapsed * 1000, 1), reason=why)


class _CountedChunkStream(ChunkStream):
    """A ChunkStream that holds one of the gateway's in-flight slots until closed."""

    def __init__(self, owner: Orchestrator, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner: Orchestrator | None = owner

    def close(self) -> None:
        if self._owner is not None and not self._done:
            # Closed before its end or its break (which log their own last lines): the
            # reader left mid-stream.
            _log_cancelled(self._journey, f"stream from {self.provider} after {self._content_chunks} chunks")
        super().close()
        if self._owner is not None:
            self._owner._in_flight -= 1
            self._owner = None


@asynccontextmanager
async def open_orchestrator(
    config: Config | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> AsyncIterator[Orchestrator]:
    """Start one actor per provider, yield the :class:`Orchestrator`, stop them on exit.

    ``transport`` replaces the network for every provider, ``transports`` per provider
    name (tests serve the mock in-process). If an actor dies, the nursery cancels the
    block and the error propagates: the gateway never runs on without a provider.
    """
    config = config if config is not None else Config.default()
    async with trio.open_nursery() as nursery:
        actors: dict[str, ActorHandle] = {}
        for provider in config.providers:
            provider_transport = (transports or {}).get(provider.name, transport)
            actors[provider.name] = await nursery.start(ProviderActor(provider, transport=provider_transport).run)
        try:
            yield Orchestrator(config, actors)
        finally:
            nursery.cancel_scope.cancel()
