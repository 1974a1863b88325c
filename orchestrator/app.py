"""The HTTP face of the gateway: OpenAI's chat-completions API, served on quart-trio.

``create_app(gw)`` builds a fresh app around an :class:`~orchestrator.service.Orchestrator`
(a quart app survives only one serving lifespan, so tests make one each). Handlers
translate HTTP to calls on the handle and back; every decision lives in the router.

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /openapi.json`` (this app's OpenAPI description), and
``POST /admin/providers/<name>/reset`` (admin key only). Every response, errors
included, carries ``x-request-id``, ``x-orchestrator-provider`` and
``x-orchestrator-attempts``; every error has OpenAI's shape, and errors the gateway
made after retrying carry ``x-should-retry: false`` so SDKs do not retry them again.

``/v1/chat/completions`` is the one path not served by a quart view: it is the hot
path, and a plain ASGI handler (:mod:`orchestrator.completions`, mounted in front of
the quart app) answers it at a fraction of quart's per-request cost, with the
same behaviour.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, NotFound

from orchestrator import openapi
from orchestrator.asgi import request_headers
from orchestrator.completions import CHAT_COMPLETIONS, ChatCompletions, error_messages
from orchestrator.errors import GatewayError, InvalidRequest, MethodNotAllowed
from orchestrator.hosting import ShieldedHTTPConnection
from orchestrator.keys import authenticate
from orchestrator.service import Orchestrator, sane_request_id

__all__ = ["GatewayApp", "create_app"]

logger = logging.getLogger("orchestrator.app")

JSON = "application/json"


class GatewayApp(QuartTrio):
    """A quart-trio app with the chat-completions handler mounted in front of it."""

    #: (path, method) pairs answered in front of quart, beside ``url_map``'s rules.
    front_routes = frozenset({(CHAT_COMPLETIONS, "POST")})
    chat_completions: ChatCompletions

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_COMPLETIONS:
            await self.chat_completions(scope, receive, send)
        elif scope["type"] == "websocket":
            await _refuse_websocket(scope, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(gw: Orchestrator) -> GatewayApp:
    """A new app serving ``gw``."""
    app = GatewayApp(__name__, static_folder=None)  # no static files: no /static route
    app.asgi_http_class = ShieldedHTTPConnection
    config = gw.config
    # The quart views read no body and answer at once; the limits still apply, so
    # nothing sent to them can hold a connection or grow memory past the lane's own.
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_body_bytes,
        BODY_TIMEOUT=config.body_timeout,
        RESPONSE_TIMEOUT=config.deadline + 5.0,
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    client_keys = [key.encode() for key in config.client_keys]
    admin_keys = [key.encode() for key in config.admin_keys]
    app.chat_completions = ChatCompletions(gw, client_keys)
    spec = orjson.dumps(openapi.document(config))  # built once: it depends on the config alone

    @app.before_request
    async def identify() -> Response | None:
        g.request_id = sane_request_id(request.headers.get("x-request-id"))
        g.provider = "none"
        g.attempts = 0
        g.client = None
        if client_keys and request.path.startswith("/v1/"):
            g.client = _authenticate(client_keys)
        elif request.path.startswith("/admin/"):
            if not admin_keys:
                raise NotFound()  # no admin key configured: the admin API does not exist
            g.client = _authenticate(admin_keys)
        return None

    @app.after_request
    async def stamp(response: Response) -> Response:
        headers = response.headers
        headers["x-request-id"] = g.get("request_id") or sane_request_id(None)
        headers.setdefault("x-orchestrator-provider", g.get("provider", "none"))
        headers.setdefault("x-orchestrator-attempts", str(g.get("attempts", 0)))
        return response

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
        gateway_error: GatewayError
        if status == 405:
            gateway_error = MethodNotAllowed(_http_message(error), allow=dict(error.get_headers())["Allow"])
        else:
            gateway_error = GatewayError(_http_message(error))
            gateway_error.status = status
            gateway_error.error_type = "invalid_request_error" if status < 500 else "server_error"
            gateway_error.code = {413: "request_too_large", 404: "not_found"}.get(status)
        return _error_response(gateway_error)

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        request_id = g.get("request_id", "-")
        logger.error("unexpected error", exc_info=error, extra={"request_id": request_id})
        return _error_response(GatewayError("The gateway hit an internal error; it has been logged."))

    return app


async def _refuse_websocket(scope: Scope, send: ASGISendCallable) -> None:
    """Answer a WebSocket handshake with a 400 in OpenAI's error shape (the server's
    ``websocket.http.response`` extension), or a bare refusal without it.

    quart would route it, and its errors need an HTTP request's context: a handshake
    for any path was a 500 and a traceback in the log."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})  # policy violation
        return
    request_id = sane_request_id(request_headers(scope).get(b"x-request-id"))
    error = InvalidRequest("This gateway does not serve WebSocket connections: "
                           "send HTTP requests, such as POST /v1/chat/completions.")
    for message in error_messages(error, request_id):
        await send({**message, "type": f"websocket.{message['type']}"})


def _authenticate(keys: list[bytes]) -> str:
    return authenticate(request.headers.get("authorization"), keys, request_id=g.request_id, path=request.path)


def _error_response(error: GatewayError) -> Response:
    if error.request_id is None:
        error.request_id = g.get("request_id")
    return Response(orjson.dumps(error.as_json()), error.status, content_type=JSON, headers=error.response_headers())


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
