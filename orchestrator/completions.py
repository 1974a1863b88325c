"""``POST /v1/chat/completions``, the gateway's hot path, as a plain ASGI handler.

:func:`orchestrator.app.create_app` mounts it in front of the quart-trio app, which
serves every other endpoint. Why not a quart view like the rest: quart's request and
response machinery (request and app contexts, werkzeug routing and headers, response
conversion, a nursery and a task per request) measured about 0.4 ms per request on
the 2-core benchmark machine, a third of everything the gateway added to a call.
Here the same work is done on the ASGI messages directly:

- **Request.** The request id is the client's ``x-request-id`` if sane, else a new
  one. With client keys configured the bearer key is checked first (401). Then
  ``X-Request-Timeout`` (400 if not a positive number), then the body: a declared
  ``Content-Length`` over ``max_body_bytes`` is refused (413) before a byte of it is
  read, a chunked one as soon as it passes the limit, and a body that has not arrived
  within ``body_timeout`` seconds is 408. It is JSON whatever the Content-Type says.
- **Routing** goes through the :class:`~orchestrator.service.Orchestrator` handle,
  under a cancel scope that is cancelled when the client disconnects, so the
  upstream call ends within a millisecond or so of the client leaving. Served by
  :mod:`orchestrator.hosting`, the connection itself cancels it
  (``DISCONNECT_EXTENSION``); under another ASGI server a task waits for
  ``http.disconnect``.
- **Streams** are routed up to their commit point (the first content chunk) before
  the status line is sent, so an early failure is still a clean JSON error. After
  it, chunks are relayed as server-sent events, each batch of waiting chunks in one
  write; a failure after the commit point ends the stream with an error event and
  no ``[DONE]``, so no client mistakes the truncated text for a whole answer.
- **Responses**, errors included, carry ``x-request-id``, ``x-orchestrator-provider``
  and ``x-orchestrator-attempts``; errors have OpenAI's shape, and those the gateway
  made after retrying say ``x-should-retry: false``. Any other method is 405.

The response's last message is sent outside the cancel scope the disconnect watcher
cancels, so hypercorn's end-of-response clean-up, which runs inside that send and
reports the stream closed, cannot cancel itself half-way (the trap
``hosting.ShieldedHTTPConnection`` works around in quart-trio).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope

from orchestrator.asgi import Message, body_message, read_body, request_headers, start_message, until_disconnect
from orchestrator.errors import GatewayError, MethodNotAllowed, StreamInterrupted
from orchestrator.keys import authenticate
from orchestrator.logs import enabled, event
from orchestrator.service import Orchestrator, sane_request_id
from orchestrator.streaming import ChunkStream
from orchestrator.validation import parse_body, parse_request_timeout

__all__ = ["CHAT_COMPLETIONS", "ChatCompletions", "error_messages"]

logger = logging.getLogger("orchestrator.app")

#: The path this handler serves.
CHAT_COMPLETIONS = "/v1/chat/completions"

_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_DONE = b"data: [DONE]\n\n"


class ChatCompletions:
    """The ASGI app for ``/v1/chat/completions`` over ``gw``.

    ``client_keys`` empty means no key is required. Calling it blocks for the request's
    whole journey; cancelling it cancels the routing and the upstream call.
    """

    def __init__(self, gw: Orchestrator, client_keys: list[bytes]) -> None:
        self._gw = gw
        self._client_keys = client_keys
        self._max_body = gw.config.max_body_bytes
        self._body_timeout = gw.config.body_timeout

    async def __call__(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        headers = request_headers(scope)
        request_id = sane_request_id(headers.get(b"x-request-id"))
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            request = await self._read_request(scope["method"], headers, request_id, receive)
            del headers  # read: not held for the rest of the request (about 0.4 KiB)
            if request is None:
                return  # the client left before its body arrived

            async def answer(routing: trio.CancelScope) -> None:
                last: list[Message] = []
                with routing:
                    last = await self._route(request, request_id, send_tracked)
                # Sent at once: any checkpoint before it would let the clean-up of the
                # attempt (its task ending, its connection going back to the pool) run first.
                for message in last:
                    await send(message)

            await until_disconnect(scope, receive, answer)
        except GatewayError as error:
            for message in error_messages(error, request_id):
                await send(message)
        except Exception as error:
            logger.error("unexpected error", exc_info=error, extra={"request_id": request_id})
            if not started:  # mid-stream, ending without the last chunk tells the client it broke
                for message in error_messages(_internal_error(), request_id):
                    await send(message)

    async def _read_request(
        self, method: str, headers: dict[bytes, str], request_id: str, receive: ASGIReceiveCallable
    ) -> tuple[dict[str, Any], float | None, str | None] | None:
        """The request's body, timeout and client key id; None if the client left.

        Raises :class:`GatewayError` when the request cannot be routed.
        """
        if method != "POST":
            raise MethodNotAllowed(f"Method {method} is not allowed on {CHAT_COMPLETIONS}.", allow="POST")
        client = None
        if self._client_keys:
            client = authenticate(
                headers.get(b"authorization"), self._client_keys, request_id=request_id, path=CHAT_COMPLETIONS
            )
        timeout = parse_request_timeout(headers.get(b"x-request-timeout"))
        raw = await read_body(
            receive, headers.get(b"content-length"), limit=self._max_body, timeout=self._body_timeout
        )
        if raw is None:
            return None
        return parse_body(raw), timeout, client

    async def _route(
        self,
        request: tuple[dict[str, Any], float | None, str | None],
        request_id: str,
        send: ASGISendCallable,
    ) -> list[Message]:
        """Route the request; return the response's last message(s), not yet sent.

        A stream's status line and chunks are sent from here; a JSON answer, or an
        error, is returned whole.
        """
        body, timeout, client = request
        try:
            if body.get("stream") is True:
                stream = await self._gw.open_stream(body, request_id=request_id, timeout=timeout, client=client)
                return await _relay(stream, send)
            completion = await self._gw.chat_completion(body, request_id=request_id, timeout=timeout, client=client)
        except GatewayError as error:
            return error_messages(error, request_id)
        content = orjson.dumps(completion.body)
        attempts = sum(1 for attempt in completion.attempts if attempt.number is not None)
        headers = _stamp(request_id, completion.provider, attempts)
        return [start_message(200, _JSON, headers, length=len(content)), body_message(content)]


async def _relay(stream: ChunkStream, send: ASGISendCallable) -> list[Message]:
    """Send a committed stream's status line and chunks; return its last message.

    Blocks until the stream ends. Cancelling it (the client left) closes the stream,
    which cancels the upstream call at once.
    """
    try:
        headers = _stamp(stream.request_id, stream.provider, stream.network_attempts) | _SSE_HEADERS
        await send(start_message(200, _SSE, headers))
        while True:
            try:
                batch = await stream.next_batch()
            except StopAsyncIteration:
                batch = []
            rest = b"".join(_sse(chunk) for chunk in batch)
            if not batch or stream.finished:
                # The chunks that came with the end leave with [DONE] and the body's
                # end: a stream that arrives at once is one write, read at once.
                break
            await send(body_message(rest, more=True))
    except StreamInterrupted as error:
        return [body_message(_sse(error.as_json()))]
    finally:
        stream.close()
    if enabled(logging.INFO):
        event(logging.INFO, stream.request_id, "stream_done",
              f"stream from {stream.provider} finished ({stream.finish_reason})",
              provider=stream.provider, finish_reason=stream.finish_reason)
    return [body_message(rest + _DONE)]


def _internal_error() -> GatewayError:
    return GatewayError("The gateway hit an internal error; it has been logged.")


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _stamp(request_id: str, provider: str, attempts: int) -> dict[str, str]:
    return {"x-request-id": request_id, "x-orchestrator-provider": provider, "x-orchestrator-attempts": str(attempts)}


def error_messages(error: GatewayError, request_id: str) -> list[Message]:
    """The ASGI messages of ``error``'s response: OpenAI's error shape, sized, with the
    request id and the journey's headers."""
    if error.request_id is None:
        error.request_id = request_id
    content = orjson.dumps(error.as_json())
    headers = {"x-request-id": request_id, **error.response_headers()}
    return [start_message(error.status, _JSON, headers, length=len(content)), body_message(content)]
