"""The HTTP face of the gateway: OpenAI's chat-completions API over quart-trio.

``create_app(gw)`` builds a fresh app around an :class:`~orchestrator.service.Orchestrator`
(a quart app survives only one serving lifespan, so tests make one each). Handlers
translate HTTP to calls on the handle and back; every decision lives in the router.

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /openapi.json`` (this app's OpenAPI description), and
``POST /admin/providers/<name>/reset`` (admin key only). Every response, errors included, carries ``x-request-id``,
``x-orchestrator-provider`` and ``x-orchestrator-attempts``; every error has
OpenAI's shape, and errors the gateway made after retrying carry
``x-should-retry: false`` so SDKs do not retry them again.

**Streaming.** The handler routes up to the commit point (the first content chunk)
before it returns, so an early failure is still a clean JSON error and no byte is
sent before there is something worth sending. After that the body generator relays
chunks; a client that disconnects raises ``Cancelled`` inside it, and its
``finally`` cancels the upstream call synchronously.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, NotFound

from orchestrator import openapi
from orchestrator.errors import AuthenticationError, GatewayError, StreamInterrupted
from orchestrator.hosting import ShieldedHTTPConnection
from orchestrator.logs import event
from orchestrator.service import Orchestrator, sane_request_id
from orchestrator.streaming import ChunkStream
from orchestrator.validation import parse_body, parse_request_timeout

__all__ = ["create_app"]

logger = logging.getLogger("orchestrator.app")

JSON = "application/json"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"


def create_app(gw: Orchestrator) -> QuartTrio:
    """A new quart-trio app serving ``gw``."""
    app = QuartTrio(__name__, static_folder=None)  # no static files: no /static route
    app.asgi_http_class = ShieldedHTTPConnection
    config = gw.config
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_body_bytes,
        BODY_TIMEOUT=config.body_timeout,
        # A streamed answer may run as long as the request's deadline, never longer.
        RESPONSE_TIMEOUT=config.deadline + 5.0,
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    client_keys = [key.encode() for key in config.client_keys]
    admin_keys = [key.encode() for key in config.admin_keys]
    spec = orjson.dumps(openapi.document(config))  # built once: it depends on the config alone

    @app.before_request
    async def identify() -> Response | None:
        g.request_id = sane_request_id(request.headers.get("x-request-id"))
        g.provider = "none"
        g.attempts = 0
        g.client = None
        if client_keys and request.path.startswith("/v1/"):
            g.client = _authenticate(request.headers.get("authorization"), client_keys)
        elif request.path.startswith("/admin/"):
            if not admin_keys:
                raise NotFound()  # no admin key configured: the admin API does not exist
            g.client = _authenticate(request.headers.get("authorization"), admin_keys)
        return None

    @app.after_request
    async def stamp(response: Response) -> Response:
        headers = response.headers
        headers["x-request-id"] = g.get("request_id") or sane_request_id(None)
        headers.setdefault("x-orchestrator-provider", g.get("provider", "none"))
        headers.setdefault("x-orchestrator-attempts", str(g.get("attempts", 0)))
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        timeout = parse_request_timeout(request.headers.get("x-request-timeout"))
        body = parse_body(await request.get_data(cache=False))
        if body.get("stream") is True:
            stream = await gw.open_stream(body, request_id=g.request_id, timeout=timeout, client=g.client)
            return await _stream_response(stream)
        completion = await gw.chat_completion(body, request_id=g.request_id, timeout=timeout, client=g.client)
        g.provider = completion.provider
        g.attempts = len([attempt for attempt in completion.attempts if attempt.number is not None])
        return Response(orjson.dumps(completion.body), 200, content_type=JSON)

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": gw.models()})

    @app.get("/health")
    async def health() -> Response:
        return _json(await gw.health())

    @app.get("/openapi.json")
    async def openapi_document() -> Response:
        return Response(spec, 200, content_type=JSON)

    @app.post("/admin/providers/<name>/reset")
    async def reset_provider(name: str) -> Response:
        if name not in {provider.name for provider in config.providers}:
            raise NotFound()
        snapshot = await gw.reset_provider(name, reason=f"admin request {g.request_id} (key {g.client})")
        return _json({"provider": name, **snapshot})

    @app.errorhandler(GatewayError)
    async def gateway_error(error: GatewayError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        gateway_error = GatewayError(_http_message(error))
        gateway_error.status = status
        gateway_error.error_type = "invalid_request_error" if status < 500 else "server_error"
        gateway_error.code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(status)
        response = _error_response(gateway_error)
        allow = dict(error.get_headers()).get("Allow")
        if allow:  # a 405 says which methods are allowed (RFC 9110)
            response.headers["allow"] = allow
        return response

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        request_id = g.get("request_id", "-")
        logger.error("unexpected error", exc_info=error, extra={"request_id": request_id})
        return _error_response(GatewayError("The gateway hit an internal error; it has been logged."))

    return app


async def _stream_response(stream: ChunkStream) -> Response:
    """Prime the event stream (the first chunk exists already) and wrap it in a Response.

    Priming starts the generator, so if the response is dropped unsent (the client left
    first) trio's async-generator finalizer still runs its ``finally`` and closes the
    upstream call.
    """
    g.provider = stream.provider
    g.attempts = stream.network_attempts
    events = _events(stream)
    first = await events.__anext__()

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for piece in events:
            yield piece

    response = Response(body(), 200, content_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS)
    response.timeout = None  # the stream's own deadline bounds it, not quart's timer
    return response


async def _events(stream: ChunkStream) -> AsyncIterator[bytes]:
    try:
        try:
            while True:
                try:
                    batch = await stream.next_batch()
                except StopAsyncIteration:
                    break
                yield b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in batch)
        except StreamInterrupted as error:
            # Honest ending: an error event and no [DONE], so no client mistakes the
            # truncated text for a whole answer.
            yield b"data: " + orjson.dumps(error.as_json()) + b"\n\n"
            return
        yield DONE
        event(logging.INFO, stream.request_id, "stream_done",
              f"stream from {stream.provider} finished ({stream.finish_reason})",
              provider=stream.provider, finish_reason=stream.finish_reason)
    finally:
        stream.close()


def _authenticate(header: str | None, keys: list[bytes]) -> str:
    """Check a bearer token against ``keys`` in constant time; return its short key id."""
    scheme, _, token = (header or "").partition(" ")
    presented = token.strip().encode()
    # Compare against every key, always, so timing says nothing about which matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    if scheme.lower() != "bearer" or not matched:
        if presented:
            event(logging.INFO, g.request_id, "unauthorized", f"rejected key {key_id(presented)} on {request.path}")
        raise AuthenticationError(
            "Missing or invalid API key: send 'Authorization: Bearer <key>' with a key this gateway accepts."
        )
    return key_id(presented)


def key_id(key: bytes) -> str:
    """A short, non-reversible id of a key, for logs: ``key_1a2b3c4d``."""
    return "key_" + hashlib.sha256(key).hexdigest()[:8]


def _error_response(error: GatewayError) -> Response:
    if error.request_id is None:
        error.request_id = g.get("request_id")
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["retry-after"] = str(int(error.retry_after))
    if not error.should_retry:
        headers["x-should-retry"] = "false"
    network = [attempt for attempt in error.attempts if attempt.number is not None]
    headers["x-orchestrator-attempts"] = str(len(network))
    headers["x-orchestrator-provider"] = network[-1].provider if network else "none"
    return Response(orjson.dumps(error.as_json()), error.status, content_type=JSON, headers=headers)


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), 200, content_type=JSON)


def _http_message(error: HTTPException) -> str:
    if error.code == 413:
        return "The request body is larger than this gateway accepts."
    if error.code == 404:
        return f"Unknown endpoint: {request.method} {request.path}."
    if error.code == 405:
        return f"Method {request.method} is not allowed on {request.path}."
    return error.description or error.name
