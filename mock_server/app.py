"""The mock provider's HTTP app (quart-trio).

Endpoints:

- ``POST /v1/chat/completions`` -- the OpenAI personality.
- ``POST /v1/messages`` -- the Anthropic personality.
- Either, behind ``/d<ms>`` (``/d50/v1/chat/completions``): that many milliseconds of
  extra latency for that request.
- ``GET /config/failures``, ``POST /config/failures`` -- the fault profiles.
- ``GET /stats``, ``POST /stats/reset`` -- what each personality received and answered.
- ``GET /health``.

A model request goes: read the body; validate it (400 in the personality's format);
decide its fault (``faults.decide``: the ``x-mock-fault`` header or the profile's
draws); wait the latency; then answer as the fault says. Bodies are JSON whatever
their Content-Type. A client that leaves before its answer is complete counts as a
disconnect.

The model endpoints are served by a plain ASGI handler in front of the quart app
(as the gateway's ``/v1/chat/completions`` is, for the same reason: quart's
per-request machinery cost more than everything else the mock does per request, and
the mock shares the benchmark machine's cores with the gateway it serves). The rest
of the API is quart views.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing

import attrs
import orjson
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from orchestrator.asgi import Message, body_message, read_body, request_headers, start_message, until_disconnect
from orchestrator.errors import BodyTimeout, BodyTooLarge
from orchestrator.hosting import ABORT_EXTENSION, ShieldedHTTPConnection

from .anthropic_wire import ANTHROPIC
from .conversation import complete
from .faults import (
    STREAM_ONLY,
    FaultKind,
    FaultProfile,
    ProfileError,
    decide,
    parse_failures_config,
    parse_fault_header,
)
from .openai_wire import OPENAI
from .state import MockState
from .wire import InvalidRequest, Personality, StreamScript

__all__ = ["FAULT_HEADER", "MockApp", "create_app"]

log = logging.getLogger(__name__)

#: Request header that forces one fault for that request alone.
FAULT_HEADER = "x-mock-fault"

_JSON = "application/json"
_JSON_TYPE = b"application/json"
_SSE_TYPE = b"text/event-stream; charset=utf-8"
_PERSONALITIES = {OPENAI.path: OPENAI, ANTHROPIC.path: ANTHROPIC}


class MockApp(QuartTrio):
    """The mock's quart-trio app, with the model endpoints answered in front of quart:
    ``POST /v1/chat/completions`` and ``/v1/messages``, and behind ``/d<ms>``."""

    mock_state: MockState

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            route = _model_route(scope["path"])
            if route is not None:
                await _model_request(self, scope, receive, send, *route)
                return
        await super().__call__(scope, receive, send)


def _model_route(path: str) -> tuple[Personality, int] | None:
    """The personality and extra latency a path asks for, or None if not a model path."""
    personality = _PERSONALITIES.get(path)
    if personality is not None:
        return personality, 0
    if path.startswith("/d"):
        digits, slash, rest = path[2:].partition("/")
        personality = _PERSONALITIES.get(slash + rest)
        if personality is not None and digits.isascii() and digits.isdigit():
            return personality, int(digits)
    return None


def create_app(state: MockState | None = None) -> MockApp:
    """A fresh mock provider app serving ``state`` (a new healthy one when None).

    Call it once per serving lifespan: a quart app does not survive two. The state is
    also reachable as ``app.extensions["mock_state"]``.
    """
    state = MockState.create() if state is None else state
    app = MockApp(__name__)
    app.asgi_http_class = ShieldedHTTPConnection
    # Stalls and slow streams are the point here: never cut a response short.
    app.config["RESPONSE_TIMEOUT"] = None
    app.mock_state = state
    app.extensions["mock_state"] = state

    @app.get("/config/failures")
    async def get_failures() -> Response:
        return _json(state.profiles_json())

    @app.post("/config/failures")
    async def set_failures() -> Response:
        try:
            update = parse_failures_config(_decode(await request.get_data()))
        except InvalidRequest as error:
            return _config_error(None, error.message)
        except ProfileError as error:
            return _config_error(error.field, error.message)
        state.configure(update.profile, update.provider)
        log.info("fault profile of %s: %s", update.provider, _describe(update.profile))
        return _json(state.profiles_json())

    @app.get("/stats")
    async def get_stats() -> Response:
        return _json(state.stats_json())

    @app.post("/stats/reset")
    async def reset_stats() -> Response:
        state.reset_stats()
        return _json(state.stats_json())

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "healthy"})

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        # 404, 405, 413, ...: in the format of the personality the client was talking to.
        personality = ANTHROPIC if request.path.endswith(ANTHROPIC.path) else OPENAI
        status = error.code or 400
        return Response(
            personality.error_body(status, error.description), status, content_type=_JSON
        )

    return app


async def _model_request(
    app: MockApp,
    scope: HTTPScope,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
    personality: Personality,
    delay_ms: int,
) -> None:
    """Answer one model request over ASGI. A client that leaves first is a disconnect."""
    state = app.mock_state
    if scope["method"] != "POST":
        reply = _error(personality, 405, "The method is not allowed for the requested URL.", headers={"allow": "POST"})
        await _send_whole(send, reply)
        return
    headers = request_headers(scope)
    try:
        body = await read_body(receive, headers.get(b"content-length"),
                               limit=app.config["MAX_CONTENT_LENGTH"], timeout=app.config["BODY_TIMEOUT"])
    except (BodyTooLarge, BodyTimeout) as error:
        await _send_whole(send, _error(personality, error.status, error.message))
        return
    if body is None:
        state[personality.name].stats.disconnects += 1
        return
    fault_header = headers.get(FAULT_HEADER.encode())
    abort = scope["extensions"].get(ABORT_EXTENSION)
    started = False

    async def answer(cancel_scope: trio.CancelScope) -> None:
        nonlocal started
        last: list[Message] = []
        try:
            with cancel_scope:
                reply = await _answer(state, personality, body, fault_header, abort, delay_ms)
                if isinstance(reply.body, bytes):
                    last = _whole(reply)
                else:
                    started = True
                    await send(start_message(reply.status, reply.content_type, reply.headers))
                    async with aclosing(reply.body) as writes:
                        async for piece, final in writes:
                            if final:  # sent below, as the body's end: one write with it
                                last = [body_message(piece)]
                            else:
                                await send(body_message(piece, more=True))
        except trio.Cancelled:  # from further out: the server is going away with the client
            state[personality.name].stats.disconnects += 1
            raise
        if cancel_scope.cancelled_caught:
            state[personality.name].stats.disconnects += 1
            return
        for message in last:
            await send(message)

    try:
        await until_disconnect(scope, receive, answer)
    except Exception:
        # A mock bug must still look like an HTTP answer, not a dropped connection.
        log.exception("the mock failed to answer a %s request", personality.name)
        if not started:
            await _send_whole(send, _error(personality, 500, "The mock failed; see its log."))


@attrs.frozen
class _Reply:
    """What a model request is answered with: all at once, or as a stream of pieces."""

    status: int
    body: bytes | AsyncIterator[tuple[bytes, bool]]
    headers: dict[str, str] = attrs.field(factory=dict)
    content_type: bytes = _JSON_TYPE


def _whole(reply: _Reply) -> list[Message]:
    assert isinstance(reply.body, bytes)
    return [start_message(reply.status, reply.content_type, reply.headers, length=len(reply.body)),
            body_message(reply.body)]


async def _send_whole(send: ASGISendCallable, reply: _Reply) -> None:
    for message in _whole(reply):
        await send(message)


async def _answer(
    state: MockState,
    personality: Personality,
    body: bytes,
    fault_header: str | None,
    abort: Callable[[], Awaitable[None]] | None,
    delay_ms: int,
) -> _Reply:
    personality_state = state[personality.name]
    profile = personality_state.profile
    stats = personality_state.stats
    stats.requests += 1
    try:
        forced = None if fault_header is None else _forced_fault(fault_header)
        chat = personality.parse_request(_decode(body), prefill_supported=profile.prefill_supported)
        if forced in STREAM_ONLY and not chat.stream:
            raise InvalidRequest(
                f"{FAULT_HEADER}: {forced.value} applies to streaming requests only", FAULT_HEADER
            )
    except InvalidRequest as error:
        stats.outcomes["invalid_request"] += 1
        return _error(personality, 400, error.message, error.param)

    decision = decide(
        profile,
        personality_state.rng,
        streaming=chat.stream,
        forced=forced,
        server_error_statuses=personality.server_error_statuses,
    )
    fault = decision.fault
    stats.outcomes["ok" if fault is None else fault.value] += 1

    latency_ms = state.latency_ms + profile.latency_ms + delay_ms
    if latency_ms:
        await trio.sleep(latency_ms / 1000)

    if fault is FaultKind.TIMEOUT:
        await trio.sleep(profile.timeout_duration_seconds)
        return _error(personality, 504)
    if fault is FaultKind.RATE_LIMIT:
        retry_after = profile.retry_after_seconds
        return _error(
            personality,
            429,
            headers={
                "retry-after": str(math.ceil(retry_after)),
                "retry-after-ms": str(round(retry_after * 1000)),
            },
        )
    if fault is FaultKind.SERVER_ERROR:
        return _error(personality, decision.status)
    if fault is FaultKind.RESET:
        if abort is None:
            return _error(
                personality, 501, "The reset fault needs a server that can reset connections."
            )
        # Shielded: a cancellation that the reset itself causes is not a disconnect.
        with trio.CancelScope(shield=True):
            await abort()
        return _Reply(204, b"")

    completion = complete(chat)
    response_id = personality.response_id(personality_state.next_response_serial())
    if chat.stream:
        script = personality.stream_script(chat, completion, response_id)
        return _Reply(200, _play(script, fault, profile), {"cache-control": "no-cache"}, _SSE_TYPE)
    if fault is FaultKind.SLOW_FIRST_TOKEN:
        await trio.sleep(profile.first_token_delay_seconds)
    return _Reply(200, personality.response_body(chat, completion, response_id))


async def _play(
    script: StreamScript, fault: FaultKind | None, profile: FaultProfile
) -> AsyncIterator[tuple[bytes, bool]]:
    """Send a stream script, bent by its fault: what ``_timeline`` lays out, one write
    per moment, each with whether it is the last.

    Events due at the same moment leave together, in one piece: a pause (a fault's, or
    ``chunk_delay_ms``) ends a write. A buffered server writes the same way, and on
    this mock an ASGI send costs far more than the bytes in it: one send per event made
    an unpaced stream cost it about 2.8 ms of CPU, enough to make the mock, not the
    client of it, the bottleneck of any streaming benchmark. The last piece (no pause
    follows it) is the body's end, which leaves with the chunked terminator: an unpaced
    stream is one write, read by its client at once.
    """
    due: list[bytes] = []
    for step in _timeline(script, fault, profile):
        if isinstance(step, bytes):
            due.append(step)
            continue
        if due:
            yield b"".join(due), False
            due.clear()
        await trio.sleep(step)
    yield b"".join(due), True


def _timeline(script: StreamScript, fault: FaultKind | None, profile: FaultProfile) -> Iterator[bytes | float]:
    """A stream script bent by its fault, as events (bytes) and pauses (seconds).

    The head comes first; slow_first_token then pauses before the first content chunk;
    stream_stall pauses, and malformed_chunk adds its bad line, after
    ``stream_fault_after_chunks`` content chunks; stream_cut ends the body after
    ``stream_cut_after_chunks`` content chunks; no_done leaves out the terminator.
    ``chunk_delay_ms`` paces the content chunks.
    """
    yield script.head
    if fault is FaultKind.SLOW_FIRST_TOKEN:
        yield profile.first_token_delay_seconds
    cut_after = profile.stream_cut_after_chunks if fault is FaultKind.STREAM_CUT else -1
    strike_after = min(profile.stream_fault_after_chunks, len(script.pieces))
    pause = profile.chunk_delay_ms / 1000
    for index, piece in enumerate([*script.pieces, None]):
        if index == strike_after and fault is FaultKind.MALFORMED_CHUNK:
            yield script.malformed
        elif index == strike_after and fault is FaultKind.STREAM_STALL:
            yield profile.stream_stall_seconds
        if index == cut_after or piece is None:
            break
        if index and pause:
            yield pause
        yield piece
    if fault is FaultKind.STREAM_CUT:
        return
    yield script.tail if fault is FaultKind.NO_DONE else script.tail + script.end


def _forced_fault(header: str) -> FaultKind:
    try:
        return parse_fault_header(header)
    except ValueError as error:
        raise InvalidRequest(str(error), FAULT_HEADER) from None


def _decode(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"The body is not valid JSON: {error}") from None


def _error(
    personality: Personality,
    status: int,
    message: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> _Reply:
    return _Reply(status, personality.error_body(status, message, param), headers or {})


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, content_type=_JSON)


def _config_error(field: str | None, message: str) -> Response:
    # The mock's own API answers in OpenAI's error shape; "param" names the field.
    error = {"message": message, "type": "invalid_request_error", "param": field, "code": None}
    return _json({"error": error}, status=400)


_DEFAULTS = FaultProfile().to_json()


def _describe(profile: FaultProfile) -> str:
    changed = {name: value for name, value in profile.to_json().items() if value != _DEFAULTS[name]}
    return ", ".join(f"{name}={value}" for name, value in changed.items()) or "healthy"
