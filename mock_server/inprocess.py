"""An httpx transport that serves an ASGI app in-process, streaming for real.

``httpx.ASGITransport`` runs the app to completion before it returns a response, so a
stalled stream, a slow first token or a client leaving mid-stream cannot be observed
through it. This transport runs the app in a task of its own and hands the body over a
bounded memory channel as the app sends it, so tests see the same timing as over a
socket -- and, with no socket involved, they can run under trio's ``MockClock``::

    async with open_mock_transport(state) as transport:
        async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
            ...

It behaves as hypercorn does where the difference could show:

- the response (status, headers) is returned as soon as the app starts it; body chunks
  arrive as the app sends them;
- closing the response early (leaving ``client.stream(...)``, or being cancelled while
  waiting for it) tells the app ``http.disconnect`` -- quart-trio then cancels the
  handler -- and anything the app sends afterwards is dropped;
- the ``orchestrator.hosting.ABORT_EXTENSION`` is in every scope; awaiting it makes the
  client's request fail with ``httpx.ReadError`` (hypercorn's reset: ECONNRESET);
- an app that fails before starting a response gives an empty 500; one that ends
  without finishing its body gives ``httpx.RemoteProtocolError`` at the end of the body;
- httpx's read timeout (``timeout=``) applies to waiting for the response head and for
  each body chunk, and raises ``httpx.ReadTimeout``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from hypercorn.typing import ASGIFramework

from orchestrator.hosting import ABORT_EXTENSION

from .app import create_app
from .state import MockState

__all__ = ["ASGIStreamingTransport", "open_asgi_transport", "open_mock_transport"]

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_mock_transport(
    state: MockState | None = None,
) -> AsyncIterator[ASGIStreamingTransport]:
    """Serve a fresh mock app over ``state`` (healthy and new when None) in-process.

    The app is ``transport.app``; its state is ``transport.app.extensions["mock_state"]``.
    """
    async with open_asgi_transport(create_app(state)) as transport:
        yield transport


@asynccontextmanager
async def open_asgi_transport(
    app: ASGIFramework, *, body_buffer: int = 16
) -> AsyncIterator[ASGIStreamingTransport]:
    """Run ``app``'s lifespan and serve its requests through the transport yielded.

    Requests still running when the block exits are cancelled, then the lifespan shuts
    down. ``body_buffer`` is how many body chunks the app may send ahead of the client
    (a socket's buffers let it run ahead a little too).
    """
    lifespan_state: dict[str, Any] = {}
    async with _lifespan(app, lifespan_state), trio.open_nursery() as request_nursery:
        transport = ASGIStreamingTransport(app, request_nursery, lifespan_state, body_buffer)
        try:
            yield transport
        finally:
            request_nursery.cancel_scope.cancel()


@asynccontextmanager
async def _lifespan(app: ASGIFramework, state: dict[str, Any]) -> AsyncIterator[None]:
    """Run the ASGI lifespan protocol around the block, as a server does.

    An app that does not speak it (it raises on the lifespan scope) is served without,
    as hypercorn does.
    """
    to_app, app_inbox = trio.open_memory_channel[dict[str, Any]](1)
    app_outbox, from_app = trio.open_memory_channel[dict[str, Any]](1)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}

    async def run_lifespan() -> None:
        async with app_outbox:
            try:
                await app(scope, app_inbox.receive, app_outbox.send)
            except Exception:
                log.warning("the app does not support the lifespan protocol", exc_info=True)

    async def step(message_type: str) -> bool:
        await to_app.send({"type": message_type})
        try:
            reply = await from_app.receive()
        except trio.EndOfChannel:
            return False
        if reply["type"] != f"{message_type}.complete":
            raise RuntimeError(f"{message_type}: {reply.get('message', reply['type'])}")
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_lifespan)
        supported = await step("lifespan.startup")
        yield
        if supported:
            await step("lifespan.shutdown")


class ASGIStreamingTransport(httpx.AsyncBaseTransport):
    """Runs each request's app call in the nursery it is given; see the module docstring.

    Build it with ``open_asgi_transport``, which owns that nursery.
    """

    def __init__(
        self,
        app: ASGIFramework,
        nursery: trio.Nursery,
        lifespan_state: dict[str, Any],
        body_buffer: int,
    ) -> None:
        self.app = app
        self._nursery = nursery
        self._lifespan_state = lifespan_state
        self._body_buffer = body_buffer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Start the app on ``request`` and return once it has started its response.

        Blocks until then; cancelling it disconnects the app's request.
        """
        exchange = _Exchange(await request.aread(), self._body_buffer)
        self._nursery.start_soon(self._run_app, self._scope(request, exchange), exchange)
        read_timeout = request.extensions.get("timeout", {}).get("read")
        handed_over = False
        try:
            with trio.move_on_after(math.inf if read_timeout is None else read_timeout):
                await exchange.started.wait()
            if not exchange.started.is_set():
                raise httpx.ReadTimeout("timed out waiting for the response", request=request)
            if exchange.aborted:
                raise httpx.ReadError("connection reset by peer", request=request)
            response = httpx.Response(
                exchange.status,
                headers=exchange.headers,
                stream=_ResponseBody(exchange, read_timeout, request),
                extensions={"http_version": b"HTTP/1.1"},
            )
            handed_over = True
            return response
        finally:
            if not handed_over:
                exchange.disconnect()

    def _scope(self, request: httpx.Request, exchange: _Exchange) -> dict[str, Any]:
        url = request.url
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.1"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": url.scheme,
            "path": url.path,  # httpx decodes it already
            "raw_path": url.raw_path.partition(b"?")[0],
            "query_string": url.query,
            "root_path": "",
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
            "client": ("127.0.0.1", 0),
            "server": (url.host, url.port or (443 if url.scheme == "https" else 80)),
            "state": dict(self._lifespan_state),
            "extensions": {ABORT_EXTENSION: exchange.abort},
        }

    async def _run_app(self, scope: dict[str, Any], exchange: _Exchange) -> None:
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:
            # hypercorn logs it and answers 500 (or cuts the body); so do we, below.
            log.exception("error in ASGI app")
        finally:
            exchange.app_finished()


class _Exchange:
    """One request's state, shared by the app's task and the client's."""

    def __init__(self, body: bytes, body_buffer: int) -> None:
        self.request_body: bytes | None = body
        #: Set once the response head is known (or the connection is gone).
        self.started = trio.Event()
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        #: Set when the app must see http.disconnect: response done, client gone, reset.
        self.gone = trio.Event()
        self.complete = False
        self.aborted = False
        self.body_sender, self.body_receiver = trio.open_memory_channel[bytes](body_buffer)

    # The app's side.

    async def receive(self) -> dict[str, Any]:
        if self.request_body is not None:
            body, self.request_body = self.request_body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone.is_set():
            return  # The connection is finished with: like a socket, drop the data.
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
            self.started.set()
        elif message["type"] == "http.response.body":
            if not self.started.is_set():
                raise RuntimeError("http.response.body sent before http.response.start")
            body = message.get("body", b"")
            if body:
                try:
                    await self.body_sender.send(body)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # The client closed the response while we waited.
            if not message.get("more_body", False):
                self.complete = True
                self.body_sender.close()
                self.gone.set()

    async def abort(self) -> None:
        """The ``ABORT_EXTENSION``: reset the "connection"."""
        self.aborted = True
        self._close()
        await trio.lowlevel.checkpoint()

    def app_finished(self) -> None:
        # Not started: the client gets an empty 500, as hypercorn sends. Started but not
        # complete: the client's body read ends in RemoteProtocolError.
        if not self.started.is_set():
            self.headers = [(b"content-length", b"0")]
            self.complete = True
        self._close()

    # The client's side.

    def disconnect(self) -> None:
        self.body_receiver.close()
        self._close()

    def _close(self) -> None:
        self.body_sender.close()
        self.started.set()
        self.gone.set()


class _ResponseBody(httpx.AsyncByteStream):
    def __init__(self, exchange: _Exchange, read_timeout: float | None, request: httpx.Request):
        self._exchange = exchange
        self._read_timeout = math.inf if read_timeout is None else read_timeout
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        while True:
            with trio.move_on_after(self._read_timeout) as waiting:
                try:
                    chunk = await exchange.body_receiver.receive()
                except trio.EndOfChannel:
                    break
            if waiting.cancelled_caught:
                raise httpx.ReadTimeout("timed out reading the body", request=self._request)
            yield chunk
        if exchange.aborted:
            raise httpx.ReadError("connection reset by peer", request=self._request)
        if not exchange.complete:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body",
                request=self._request,
            )

    async def aclose(self) -> None:
        self._exchange.disconnect()
