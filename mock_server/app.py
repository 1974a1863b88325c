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
their Content-Type.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

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
from .state import MockState, Stats
from .wire import InvalidRequest, Personality, StreamScript

__all__ = ["FAULT_HEADER", "create_app"]

log = logging.getLogger(__name__)

#: Request header that forces one fault for that request alone.
FAULT_HEADER = "x-mock-fault"

_JSON = "application/json"
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


def create_app(state: MockState | None = None) -> QuartTrio:
    """A fresh mock provider app serving ``state`` (a new healthy one when None).

    Call it once per serving lifespan: a quart app does not survive two. The state is
    also reachable as ``app.extensions["mock_state"]``.
    """
    state = MockState.create() if state is None else state
    app = QuartTrio(__name__)
    app.asgi_http_class = ShieldedHTTPConnection
    # Stalls and slow streams are the point here: never cut a response short.
    app.config["RESPONSE_TIMEOUT"] = None
    app.extensions["mock_state"] = state

    async def openai_chat(delay_ms: int = 0) -> Response:
        return await _model_request(state, OPENAI, delay_ms)

    async def anthropic_messages(delay_ms: int = 0) -> Response:
        return await _model_request(state, ANTHROPIC, delay_ms)

    for personality, view in ((OPENAI, openai_chat), (ANTHROPIC, anthropic_messages)):
        app.add_url_rule(personality.path, view_func=view, methods=["POST"])
        app.add_url_rule(
            f"/d<int:delay_ms>{personality.path}",
            endpoint=f"{view.__name__}_delayed",
            view_func=view,
            methods=["POST"],
        )

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


async def _model_request(state: MockState, personality: Personality, delay_ms: int) -> Response:
    """Answer one model request. A cancellation (the client left) counts as a disconnect."""
    personality_state = state[personality.name]
    try:
        body = await request.get_data()
        return await _answer(
            state,
            personality,
            body,
            request.headers.get(FAULT_HEADER),
            (request.scope.get("extensions") or {}).get(ABORT_EXTENSION),
            delay_ms,
        )
    except trio.Cancelled:
        personality_state.stats.disconnects += 1
        raise


async def _answer(
    state: MockState,
    personality: Personality,
    body: bytes,
    fault_header: str | None,
    abort: Callable[[], Awaitable[None]] | None,
    delay_ms: int,
) -> Response:
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
        return Response(b"", 204)

    completion = complete(chat)
    response_id = personality.response_id(personality_state.next_response_serial())
    if chat.stream:
        script = personality.stream_script(chat, completion, response_id)
        return Response(_play(script, fault, profile, stats), 200, _SSE_HEADERS)
    if fault is FaultKind.SLOW_FIRST_TOKEN:
        await trio.sleep(profile.first_token_delay_seconds)
    return Response(
        personality.response_body(chat, completion, response_id), 200, content_type=_JSON
    )


async def _play(
    script: StreamScript, fault: FaultKind | None, profile: FaultProfile, stats: Stats
) -> AsyncIterator[bytes]:
    """Send a stream script, bent by its fault. Abandoning it counts as a disconnect.

    The head goes at once; slow_first_token then waits before the first content chunk;
    stream_stall waits, and malformed_chunk adds its bad line, after
    ``stream_fault_after_chunks`` content chunks; stream_cut ends the body after
    ``stream_cut_after_chunks`` content chunks; no_done leaves out the terminator.
    ``chunk_delay_ms`` paces the content chunks.
    """
    try:
        yield script.head
        if fault is FaultKind.SLOW_FIRST_TOKEN:
            await trio.sleep(profile.first_token_delay_seconds)
        cut_after = profile.stream_cut_after_chunks if fault is FaultKind.STREAM_CUT else -1
        strike_after = min(profile.stream_fault_after_chunks, len(script.pieces))
        pause = profile.chunk_delay_ms / 1000
        for index, piece in enumerate([*script.pieces, None]):
            if index == strike_after and fault is FaultKind.MALFORMED_CHUNK:
                yield script.malformed
            elif index == strike_after and fault is FaultKind.STREAM_STALL:
                await trio.sleep(profile.stream_stall_seconds)
            if index == cut_after or piece is None:
                break
            if index and pause:
                await trio.sleep(pause)
            yield piece
        if fault is FaultKind.STREAM_CUT:
            return
        yield script.tail if fault is FaultKind.NO_DONE else script.tail + script.end
    except (trio.Cancelled, GeneratorExit):
        # Cancelled: the client left during one of our sleeps; GeneratorExit: it left
        # while a chunk was being sent, and quart closed the generator.
        stats.disconnects += 1
        raise


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
) -> Response:
    return Response(
        personality.error_body(status, message, param), status, headers, content_type=_JSON
    )


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
