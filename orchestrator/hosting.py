"""Serve a quart-trio (or any ASGI) app on hypercorn's trio worker.

This is the one module that knows how hypercorn is driven; the mock provider and the
gateway both serve through it::

    app = create_app(...)
    app.asgi_http_class = ShieldedHTTPConnection   # quart-trio apps: see the class
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(serve, app, host="127.0.0.1", port=0))
        ...  # urls == ["http://127.0.0.1:53117"]

or, for a command-line entry point, ``run(app, host=..., port=...)``, which serves until
SIGINT or SIGTERM. Several processes share one port through ``bind_sockets(host, port,
count=N)`` (bound before they fork, one ``SO_REUSEPORT`` listener each) and
``serve(app, sockets=[...])``.

What it adds to ``hypercorn.trio.serve``:

- ``task_status.started(urls)`` reports the addresses actually bound, so port 0 works.
- Connections waiting to be accepted are accepted together (``accept_connections``;
  trio's ``serve_listeners`` takes one per pass of the scheduler), so new clients of a
  busy server are not held in the backlog behind the requests in flight.
- At shutdown the listeners are closed first (new connections are refused at once),
  idle keep-alive connections are closed, and in-flight requests get
  ``graceful_timeout`` seconds before they are cancelled.
- quart's ``RESPONSE_TIMEOUT`` (60 s by default) still cuts any longer response of a
  quart view short, streams included: an app sets it from its own deadlines (the mock
  sets None). Plain ASGI handlers mounted in front of quart bound their own time.
- Every HTTP request scope carries an abort function under ``ABORT_EXTENSION`` in
  ``scope["extensions"]``: awaiting it resets the TCP connection (the peer sees a
  connection reset, not a response). The mock provider's ``reset`` fault uses it.
- And, on HTTP/1.x, a function under ``DISCONNECT_EXTENSION`` that takes a
  ``trio.CancelScope`` and cancels it if the client disconnects before its response
  has been sent: prompt cancellation for a handler without a task parked on
  ``receive()`` for ``http.disconnect`` (a task costs its spawn, its wake-up and its
  exit, on every request). An HTTP/2 request is told by ``http.disconnect`` alone.
- A client that takes no byte of its answer for ``send_timeout`` seconds (30) has its
  connection reset and its request told it left, and on HTTP/1.x a write waiting for
  a client can be cancelled (hypercorn shields it: a client that never read held its
  request, and a shutdown, for ever). That bounds writes to the socket; an HTTP/2
  stream waiting for its flow-control window is hypercorn's, and not bounded.
- HTTP/1.1 is parsed by llhttp and framed by :mod:`orchestrator.http1` instead of h11
  (HTTP/2 and upgrades are still hypercorn's own), and a write goes straight to the
  socket when no other is under way: together a fifth of a small request's CPU in the
  gateway, and half of it in the mock (A/B runs against hypercorn's own).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import logging
import math
import os
import select
import signal
import socket
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from functools import partial
from heapq import heappop, heappush
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from hypercorn.utils import repr_socket_addr
from quart_trio.asgi import TrioASGIHTTPConnection

from .http1 import Http1Protocol

__all__ = [
    "ABORT_EXTENSION",
    "DISCONNECT_EXTENSION",
    "accept_connections",
    "ShieldedHTTPConnection",
    "bind_sockets",
    "hypercorn_config",
    "run",
    "serve",
    "serve_until_signalled",
    "tune_collector_for_serving",
    "watch_signals",
]

log = logging.getLogger(__name__)

#: Key in ``scope["extensions"]`` of an async function that resets the connection.
ABORT_EXTENSION = "orchestrator.hosting.abort"

#: Key in ``scope["extensions"]`` of a function that cancels a scope on disconnect.
DISCONNECT_EXTENSION = "orchestrator.hosting.cancel_on_disconnect"

#: Connections accepted per wake-up of ``accept_connections`` at most: enough for any
#: burst, few enough that accepting never holds up the requests in flight for long.
ACCEPT_BATCH = 256
#: How long a client may take no byte of its answer before its connection is reset.
SEND_TIMEOUT = 30.0
#: How long the accept loop waits when the process is out of file descriptors or memory.
ACCEPT_RETRY_SECONDS = 0.1
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: A connection that failed between the client's connect and our accept (as trio skips).
_SKIPPED_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
                                      "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name)
)
_CLOSED_SOCKET_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})

#: SO_LINGER on, with a zero timeout: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


class ShieldedHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, with the response's final send shielded.

    Set it as a QuartTrio app's ``asgi_http_class``. The final ``http.response.body``
    send runs hypercorn's end-of-response clean-up inline; part of that clean-up delivers
    ``http.disconnect`` back to quart-trio, which cancels the request's nursery -- and so
    cancels the rest of the clean-up, half done. Idle keep-alive connections are then
    never closed, a connection stays open after an early 413, and a graceful shutdown
    waits the whole grace period for kept-alive clients. Shielding that one send lets
    the clean-up finish. It only runs hypercorn's bookkeeping and a socket write, which
    ends within ``send_timeout`` seconds however slow the client (``_Connection._write``).
    """

    async def _send_response(self, send: ASGISendCallable, response: Any) -> None:
        async def send_shielding_last(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await super()._send_response(send_shielding_last, response)


def hypercorn_config(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_timeout: float = 3.0,
    keep_alive_timeout: float = 5.0,
    send_timeout: float = SEND_TIMEOUT,
    max_header_bytes: int = 16 * 1024,
) -> Config:
    """A hypercorn ``Config`` for one plain-HTTP listener on ``host:port``.

    ``graceful_timeout`` is how long in-flight requests may run after shutdown starts;
    ``keep_alive_timeout`` is how long an idle kept-alive connection stays open;
    ``send_timeout`` is how long a client may take no byte of its answer before its
    connection is reset (what nginx calls ``send_timeout``);
    ``max_header_bytes`` bounds a request's head (431 past it). The access
    log is off (it costs a line per request), and hypercorn's own errors go to the
    ``hypercorn.error`` logger so that the caller's logging configuration applies.
    """
    config = _Config()
    bind_host = f"[{host}]" if ":" in host else host
    config.bind = [f"{bind_host}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = keep_alive_timeout
    config.send_timeout = send_timeout
    # hypercorn's default of 100 overflows when hundreds of clients connect at once (a
    # burst of 500 connects left SYNs to be retried a second later: multi-second p99s).
    config.backlog = 1024
    config.h11_max_incomplete_size = max_header_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False  # no need to tell every client what serves it
    return config


class _Config(Config):
    """hypercorn's ``Config``, whose response headers (``Date``, and ``Server`` when
    enabled) are formatted once a second instead of on every response (hypercorn formats the date
    with ``wsgiref`` per response: about 1% of a small request's cost)."""

    _headers_second = -1
    _headers: dict[str, list[tuple[bytes, bytes]]]
    send_timeout = SEND_TIMEOUT

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        second = int(time.time())
        if second != self._headers_second:
            self._headers = {}
            self._headers_second = second
        headers = self._headers.get(protocol)
        if headers is None:
            headers = self._headers[protocol] = super().response_headers(protocol)
        return list(headers)  # hypercorn appends to what it gets


def bind_sockets(host: str, port: int, *, count: int = 1) -> list[socket.socket]:
    """``count`` listening TCP sockets on ``host:port``, for ``serve(sockets=...)``.

    With ``count`` above 1 each socket has ``SO_REUSEPORT``, so one process each can
    accept on the same port and the kernel spreads new connections over them by
    address hash (rather than waking every process for every connection). ``port=0``
    binds the first to a free port and the others to the same one. Raises ``OSError``
    if the address cannot be bound; nothing is left open then.
    """
    config = hypercorn_config(host=host, port=port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(config.backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve(
    app: ASGIFramework,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    sockets: list[socket.socket] | None = None,
    graceful_timeout: float = 3.0,
    keep_alive_timeout: float = 5.0,
    send_timeout: float = SEND_TIMEOUT,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger()`` returns, then shut down gracefully.

    Blocks for the server's whole life. Runs the app's lifespan startup before binding
    is reported, reports the bound URLs (``["http://127.0.0.1:8001"]``) through
    ``task_status``, and accepts connections until ``shutdown_trigger`` returns (never,
    when it is None: cancel the caller's scope to stop). Shutdown then closes the
    listeners, closes idle connections, gives in-flight requests ``graceful_timeout``
    seconds, cancels what is left, runs the lifespan shutdown and returns.

    A client that takes no byte of its answer for ``send_timeout`` seconds has its
    connection reset.

    ``sockets`` (listening, from :func:`bind_sockets`) replaces binding ``host:port``;
    ``serve`` closes them when it stops.

    Cancelling ``serve`` itself stops everything at once, with no grace period.
    """
    config = hypercorn_config(
        host=host,
        port=port,
        graceful_timeout=graceful_timeout,
        keep_alive_timeout=keep_alive_timeout,
        send_timeout=send_timeout,
    )
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(_HypercornApp(app), config, lifespan_state)
    context = WorkerContext(max_requests=None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        urls = []
        if sockets is None:
            sockets = config.create_sockets().insecure_sockets
            for sock in sockets:
                sock.listen(config.backlog)
        for sock in sockets:
            sock.setblocking(False)
            urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
        try:
            connections: set[_Connection] = set()
            idle = _IdleConnections()
            # The idle watch runs as long as any connection: it ends after them.
            async with trio.open_nursery() as idle_nursery:
                idle_nursery.start_soon(idle.run)
                async with trio.open_nursery() as connection_nursery:
                    handler = partial(_Connection, app, config, context, lifespan_state, connections, idle)
                    async with trio.open_nursery() as accept_nursery:
                        for sock in sockets:
                            accept_nursery.start_soon(accept_connections, sock, handler, connection_nursery)
                        log.info("serving on %s", ", ".join(urls))
                        task_status.started(urls)
                        await (shutdown_trigger or trio.sleep_forever)()
                        accept_nursery.cancel_scope.cancel()
                    # No longer accepting: a client connecting from now on is refused.
                    for sock in sockets:
                        sock.close()
                    log.info("shutting down %s", ", ".join(urls))
                    # Idle keep-alive connections close now; busy ones see the event when
                    # their response ends and do not recycle.
                    await context.terminated.set()
                    for connection in list(connections):
                        connection.close_if_idle()
                    connection_nursery.cancel_scope.deadline = trio.current_time() + graceful_timeout
                idle_nursery.cancel_scope.cancel()
        finally:
            # Closed above on the way to a graceful shutdown; this covers being
            # cancelled. Closing twice is harmless.
            for sock in sockets:
                sock.close()

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def serve_until_signalled(
    app: ASGIFramework,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    **serve_options: Any,
) -> None:
    """``serve(app, **serve_options)`` with SIGINT or SIGTERM as its shutdown trigger.

    The first signal starts a graceful shutdown; a second one cancels at once. Must run
    in the main thread (signal handling needs it). Returns once the server has stopped.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        first_signal = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, signals, first_signal, nursery.cancel_scope)
            await serve(
                app,
                shutdown_trigger=first_signal.wait,
                task_status=task_status,
                **serve_options,
            )
            nursery.cancel_scope.cancel()


def run(app: ASGIFramework, **serve_options: Any) -> None:
    """Block in ``trio.run`` serving ``app`` until SIGINT or SIGTERM (see ``serve``).

    This is the process's whole life: it sets the garbage collector up for serving
    first (see ``tune_collector_for_serving``).
    """
    tune_collector_for_serving()
    trio.run(partial(serve_until_signalled, app, **serve_options))


#: Allocations of container objects, net of their deallocations, that start a
#: collection of the youngest generation (CPython's default is 700). See
#: ``tune_collector_for_serving``.
YOUNG_COLLECTION_THRESHOLD = 50_000


async def accept_connections(
    sock: socket.socket,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    handler_nursery: trio.Nursery,
) -> None:
    """Accept connections on the listening, non-blocking ``sock`` until cancelled, each
    served by ``handler(stream)`` in a task of ``handler_nursery`` (its stream closed after).

    ``trio.serve_listeners`` accepts one connection per pass of the scheduler (each
    accept is a checkpoint). A server busy with hundreds of requests makes long passes,
    and a burst of new clients waits in the kernel's backlog, one pass each, before
    its first request is even read (250 clients joining 250 others on a saturated
    gateway: their p99 0.9-1.4 s, against 0.7-0.9 s accepted at once; where the passes
    were longer still, some waited 8 s). Here each wake-up accepts every connection
    already waiting, up to ``ACCEPT_BATCH``, before it lets other tasks run.

    Errors are trio's: running out of file descriptors or memory is logged and retried
    after ``ACCEPT_RETRY_SECONDS``; a connection that failed before it was accepted
    is skipped; a closed ``sock`` ends the loop; anything else is raised.
    """
    while True:
        accepted = 0
        while accepted < ACCEPT_BATCH:
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in _CLOSED_SOCKET_ERRNOS:
                    return
                if error.errno in _SKIPPED_ACCEPT_ERRNOS:
                    continue
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed: %s; retrying in %s s", os.strerror(error.errno), ACCEPT_RETRY_SECONDS)
                await trio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            accepted += 1
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
            handler_nursery.start_soon(_serve_connection, handler, stream, name=_CONNECTION_TASK_NAME)
        if accepted < ACCEPT_BATCH:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:  # closed while waiting (notify_closing)
                return
        else:
            await trio.lowlevel.checkpoint()


async def _serve_connection(handler: Callable[[trio.SocketStream], Awaitable[object]], stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


# The name trio gives the task (formatted once, not at every accept: about 80 bytes a
# connection).
_CONNECTION_TASK_NAME = f"{__name__}.{_serve_connection.__qualname__}"


def tune_collector_for_serving() -> None:
    """Set CPython's cyclic garbage collector up for a process that serves until it exits.

    Call it once, after the imports and before serving (before forking workers, so
    that they inherit it). Under load the collector's cost grows with the requests in
    flight. A collection of the youngest generation starts once allocations of
    container objects outnumber their deallocations by its threshold, which the ebb
    and flow of hundreds of requests in flight does many times a second though
    nothing accumulates; each one traverses the young objects of every request in
    flight and promotes them, and the older generations traverse them again. With 500
    requests in flight CPython's defaults cost the gateway 0.27-0.32 ms of CPU per
    request, a fifth of its time, and full collections paused everything for about
    100 ms. Two changes:

    - ``gc.freeze()``: what exists now -- modules, classes, functions, some sixty
      thousand objects that live as long as the process -- moves to a permanent
      generation that no collection traverses again (and forked workers stop
      writing to the pages they share with their parent for it);
    - the youngest generation's threshold is ``YOUNG_COLLECTION_THRESHOLD`` instead
      of 700. At 10,000 it was still crossed six to nine times a second with 500
      requests in flight, 0.07-0.12 ms of CPU per request (13 ms a collection); at
      50,000, once every three to six seconds, about 0.01 ms per request (about
      40 ms a collection). Timed with ``gc.callbacks``.

    Answering a request leaves no reference cycles, and neither does an HTTP/1.x
    connection that ends (``_Connection.run`` unlinks its parts), so collecting rarely
    keeps next to no garbage alive for longer. (A connection handed over to hypercorn's
    own protocols -- HTTP/2, an upgrade -- may still leave cycles within their state:
    about ninety objects for an HTTP/2 one, to the next collection.) Not for a process
    that runs other work (a test run,
    a program that embeds the gateway): it changes the collector for all of it.
    """
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)


async def watch_signals(
    signals: Any, first_signal: trio.Event, everything: trio.CancelScope
) -> None:
    """Set ``first_signal`` on the first signal received; cancel ``everything`` on the second.

    ``signals`` is a ``trio.open_signal_receiver``; returns after the second signal.
    """
    async for signum in signals:
        if first_signal.is_set():
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            everything.cancel()
            return
        log.info("%s: shutting down gracefully", signal.Signals(signum).name)
        first_signal.set()


class _HypercornApp:
    """An ASGI 3 app in hypercorn's calling convention (what ``wrap_app`` builds).

    Given the ``connection`` it serves, every HTTP scope also carries its ``abort`` under
    ``ABORT_EXTENSION``, and an HTTP/1.x one its ``cancel_on_disconnect`` under
    ``DISCONNECT_EXTENSION``.
    """

    def __init__(self, app: ASGIFramework, connection: _Connection | None = None) -> None:
        self.app = app
        self.connection = connection
        self.extensions: dict[str, Any] = {}
        if connection is not None:
            self.extensions = {
                ABORT_EXTENSION: connection.abort,
                DISCONNECT_EXTENSION: connection.cancel_on_disconnect,
            }

    def __call__(
        self,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> Awaitable[None]:
        # Not a coroutine function: it returns the app's own coroutine for hypercorn to
        # await, so a request in flight holds no frame of this one (about 0.25 KiB).
        if scope["type"] == "http" and self.connection is not None:
            if scope["http_version"] in ("1.0", "1.1"):
                scope["extensions"].update(self.extensions)
                # Over HTTP/2 hypercorn's send task writes frames as flow control
                # allows: a held frame could wait for a window only its delivery opens.
                send = partial(self.connection.send_message, send)
            else:
                # HTTP/2 serves requests side by side on a connection, which has one
                # scope to cancel, and one of them can end alone (RST_STREAM): each is
                # told through ``http.disconnect``, which hypercorn sends for both.
                scope["extensions"][ABORT_EXTENSION] = self.extensions[ABORT_EXTENSION]
        return self.app(scope, receive, send)


class _Connection(TCPServer):
    """hypercorn's trio connection handler, with ``ABORT_EXTENSION`` in HTTP scopes (and
    ``DISCONNECT_EXTENSION`` in HTTP/1.x ones), a read loop that ends when the connection
    does, and writes bounded by ``send_timeout`` (see ``_write``).

    When a client sends its next request before the current one is answered (wrk does,
    any pipelining client does), the read loop waits inside the protocol for the
    current cycle to end. If the server then closes the connection
    instead of starting the next cycle (shutting down, ``Connection: close``), nothing
    wakes that wait again: the connection task lingers until the grace period cancels
    it, so a graceful shutdown under keep-alive load took the whole grace period. Here
    the read loop runs in a cancel scope that closing the connection cancels.

    Idle connections are closed once past their deadline by one task for all of them
    (``_IdleConnections``), not by a task or a cancel scope of their own; at shutdown
    ``serve`` closes the idle ones through ``close_if_idle``.

    Writes are also fewer: hypercorn hands over a response's head, each body piece and
    the end of the body (empty, or a chunked body's terminator) as separate writes, each
    behind a lock, a shielded scope and a socket call. On HTTP/1.x, empty writes are
    dropped; a response's head is held until the next write (its body, or the
    connection's next event); and a response's last body piece is held until the end of
    the body, which hypercorn writes next (see ``send_message``, which knows both from
    the app's messages). So a whole small answer leaves in one socket write, and a
    stream's last piece and terminator in one: the client reads the end of a stream
    once, not twice. Informational heads (``100 Continue``) go at once.
    """

    def __init__(
        self,
        app: ASGIFramework,
        config: Config,
        context: WorkerContext,
        state: dict[str, Any],
        registry: set[_Connection],
        idle: _IdleConnections,
        stream: trio.SocketStream,
    ) -> None:
        super().__init__(_HypercornApp(app, self), config, context, state, stream)
        self.idle_task = _KeepAlive(self)
        self._registry = registry
        self._idle = idle
        self._watched = False  # whether ``idle`` holds an entry for it
        self._waiting_for_bytes = False
        self._idle_expired = False
        # Cancelled when our side closes the connection, or once it has been idle past
        # its deadline (see ``close_if_waiting``).
        self._reading = trio.CancelScope()
        self._held = b""
        self._hold_next = False
        self._on_disconnect: trio.CancelScope | None = None
        self._gone = False  # a write found the client gone, or gave up on it
        self._idle_deadline = math.inf
        self._socket = stream.socket  # plain TCP: ``serve`` has no TLS

    async def run(self) -> None:
        self._registry.add(self)
        try:
            await super().run()
        finally:
            self._registry.discard(self)
            # The connection's parts point back at it (the app's extensions and the
            # protocol's ``send`` are its bound methods, the idle task holds it), so
            # it would outlive its task, socket object and all, until the cyclic
            # collector ran: which a serving process does rarely (see
            # ``tune_collector_for_serving``). Its task is over; so are its requests.
            self.__dict__.pop("protocol", None)
            del self.app, self.idle_task
            self._on_disconnect = None

    def idle_from_now(self) -> None:
        """No request in progress: close after ``keep_alive_timeout`` without one, or now
        if the server is shutting down."""
        if self.context.terminated.is_set():
            self._set_idle_deadline(-math.inf)
        else:
            self._set_idle_deadline(trio.current_time() + self.config.keep_alive_timeout)

    def busy(self) -> None:
        """A request is in progress: no idle deadline until it ends."""
        self._set_idle_deadline(math.inf)

    def close_if_idle(self) -> None:
        """At shutdown: an idle connection closes now (a busy one will once its response
        ends, since hypercorn does not start another cycle once shutdown has begun)."""
        if self._idle_deadline != math.inf:
            self._set_idle_deadline(-math.inf)

    def _set_idle_deadline(self, deadline: float) -> None:
        self._idle_deadline = deadline
        if deadline == -math.inf:
            self.close_if_waiting()
        elif deadline != math.inf and not self._watched:
            self._watched = True
            self._idle.watch(self, deadline)

    def idle_deadline_passed(self, now: float) -> float | None:
        """For ``_IdleConnections``, whose entry for this connection is due: closes it if
        it has been idle past its deadline; or the deadline to be watched for next."""
        self._watched = False
        deadline = self._idle_deadline
        if deadline == math.inf:
            return None  # busy: watched again once idle
        if deadline > now:  # busy and idle again since it was watched
            self._watched = True
            return deadline
        self.close_if_waiting()
        return None

    def close_if_waiting(self) -> None:
        """Close the connection if its read loop is waiting for the client's bytes and
        none have arrived: its wait ends at once, with no bytes taken from the socket.

        Bytes waiting in the kernel are served instead (the read loop may have been
        woken for them already): a request that arrives as the deadline passes is
        answered, not cut. The read loop itself closes the connection, before its next
        wait, when it finds its idle deadline passed (``_receive``).
        """
        if self._waiting_for_bytes and not _readable_now(self._socket):
            self._idle_expired = True
            self._reading.cancel()

    def cancel_on_disconnect(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` if the client goes away before the current response is sent.

        One scope per connection: HTTP/1.1 serves one request at a time, and a scope
        from a finished request is replaced by the next one's (cancelling a scope
        that has been exited does nothing).
        """
        self._on_disconnect = scope

    async def _read_data(self) -> None:
        # hypercorn's loop, with the keep-alive deadline on each read instead of its
        # ``fail_after(read_timeout)`` (``hypercorn_config`` sets no read timeout).
        wrapper = self.protocol
        if isinstance(wrapper.protocol, H11Protocol):
            # HTTP/1.1 through llhttp (see ``http1``); hypercorn's ProtocolWrapper still
            # switches to HTTP/2 when Http1Protocol hands an upgrade to H11Protocol.
            wrapper.protocol = Http1Protocol(
                wrapper.app, wrapper.config, wrapper.context, wrapper.task_group, wrapper.state,
                wrapper.ssl, wrapper.client, wrapper.server, wrapper.send,
            )
        with self._reading:
            while (data := await self._receive()) is not None:
                ended = not data
                await self.protocol.handle(RawData(data))
                # Not held while the next read waits, which is most of a request's life.
                del data
                if ended:
                    break
            await self.protocol.handle(Closed())
        if self._idle_expired:
            await self.protocol.handle(Closed())
        # The client closed or reset the connection, or it was idle too long (or we
        # closed it, when this does nothing). hypercorn has just told the app
        # ``http.disconnect``.
        if self._on_disconnect is not None:
            self._on_disconnect.cancel()

    async def _receive(self) -> bytes | None:
        """The client's next bytes (``b""`` at its end of the stream), or None when the
        connection is gone (reset, or closed by us) or has been idle past its deadline.

        Bytes already waiting are read straight from the socket, with no cancel scope and
        no trip through the scheduler: under load that is most reads. Otherwise it waits
        for the socket to have some, with no cancel scope either (one per wait was about
        0.6 KiB held by every request in flight, and a few microseconds each): an idle
        connection's deadline is watched by ``_IdleConnections``, which ends the wait
        when it passes. Not a checkpoint when it did not wait; whoever then handles the bytes has one
        soon enough (a request's body goes through a channel, its answer through a
        socket), and a head has a size limit.
        """
        socket = self._socket
        while True:
            try:
                return os.read(socket.fileno(), MAX_RECV)
            except BlockingIOError:
                pass
            except OSError:  # reset by the client, or closed by us (EBADF)
                return None
            if self._idle_deadline <= trio.current_time():
                return None  # idle for keep_alive_timeout, or idle at shutdown: close
            self._waiting_for_bytes = True
            try:
                await trio.lowlevel.wait_readable(socket)
            except trio.ClosedResourceError:  # closed by us while waiting
                return None
            finally:
                self._waiting_for_bytes = False

    async def send_message(self, send: ASGISendCallable, message: dict[str, Any]) -> None:
        """What the app calls as ``send`` on HTTP/1.x: hypercorn's ``send``, with the
        write it makes held back when more of the response is sure to follow.

        A response's head (``http.response.start``) waits for the next write, normally
        its body's first piece. A last body piece waits for the end of the body (a
        chunked body's terminator, or an empty write), which hypercorn makes in the
        same call; what is still held when that call ends or fails goes then.
        """
        if self._gone:
            # hypercorn drops what is sent to a closed stream without a checkpoint: an
            # app sending in a loop would never be told that its client left.
            await trio.lowlevel.checkpoint()
        kind = message["type"]
        last_piece = kind == "http.response.body" and not message.get("more_body", False) and bool(message.get("body"))
        if kind != "http.response.start" and not last_piece:
            await send(message)
            return
        self._hold_next = True
        try:
            await send(message)
        finally:
            self._hold_next = False
            if last_piece and self._held:
                await self._send_held()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            data = self._held + event.data if self._held else event.data
            self._held = b""
            if self._hold_next:  # see send_message
                self._hold_next = False
                self._held = data
            elif data:
                await self._write(data)
            return
        if self._held:  # any other event lets what is held go first
            await self._send_held()
        await super().protocol_send(event)
        if isinstance(event, Closed):
            # Our side closed the connection: there is nothing left to read.
            self._reading.cancel()

    async def _send_held(self) -> None:
        data, self._held = self._held, b""
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        """Write ``data`` to the socket, after anything already being written.

        When no other write is under way the bytes go straight to the socket, and when it
        takes them all (a response into an empty send buffer: nearly always) that is the
        whole write: hypercorn's takes a lock, a shielded cancel scope and trio's
        ``send_all``, about a tenth of a small request's CPU. Like hypercorn's, it raises
        ``Cancelled`` in a cancelled scope before writing anything, and a connection
        found gone is told to the protocol (``Closed``) instead of raised.

        What the socket does not take waits, behind the connection's send lock, for the
        client to read, and that wait is bounded: a client that takes no byte for
        ``send_timeout`` seconds is gone, and its connection reset. hypercorn's waited,
        shielded, for as long as the client did not read, holding the request, its slot
        at the gateway, and the process at shutdown. On HTTP/1.x the wait can be
        cancelled, which resets the connection too (half an answer can be followed by
        nothing else); on HTTP/2 it stays shielded (see below). The request is then told
        that its client left.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.send_lock.locked():
            sent = self._write_now(data)
            if sent == len(data):
                return
            data = b"" if sent is None else data[sent:]
        if data:
            try:
                # HTTP/2 writes one connection's frames for many requests, and a frame
                # dropped or cut (h2 has already counted it sent) breaks the connection
                # for all: a request cancelled while its write waits lets it end
                # (written, or timed out) first, as under hypercorn, but not for ever.
                with trio.CancelScope(shield=isinstance(self.protocol.protocol, H2Protocol)):
                    async with self.send_lock:
                        if await self._write_waiting(data):
                            return
            except trio.Cancelled:  # half an HTTP/1.x answer can be followed by nothing
                self._reset()
                raise
        self._gone = True
        await self.protocol.handle(Closed())
        # Then the request learns that its client left (the read loop would tell it
        # when it next runs). Not before: the writer is as a rule the request itself,
        # and cancelled, it would stop the protocol's clean-up halfway (a pipelined
        # request waiting for this one's end would wait for ever).
        if self._on_disconnect is not None:
            self._on_disconnect.cancel()

    def _write_now(self, data: bytes) -> int | None:
        """As much of ``data`` as the socket takes now: how many bytes, None if it is gone."""
        try:
            # Asked afresh each time: a closed socket says -1 (EBADF below), while a
            # number kept from before could by now name another client's socket.
            return os.write(self._socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError:  # reset or closed by the client, or closed by us
            return None

    async def _write_waiting(self, data: bytes) -> bool:
        """Write all of ``data``, waiting for the client to read: False if the client
        went, or took nothing for ``send_timeout`` seconds (the connection is then reset).

        Called with the send lock held, so nothing else writes meanwhile. Nothing yields
        between ``_write``'s first try and taking the lock (whose checkpoint is
        shielded), so a cancellation cannot fall between a part written and the rest.
        """
        timeout = self.config.send_timeout
        deadline = trio.current_time() + timeout
        try:
            while True:
                sent = self._write_now(data)
                if sent is None:
                    return False
                data = data[sent:]
                if not data:
                    return True
                if sent:
                    deadline = trio.current_time() + timeout
                elif trio.current_time() >= deadline:
                    log.info("a client took nothing of its answer for %gs: connection reset", timeout)
                    self._reset()
                    return False
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_writable(self._socket)
        except trio.ClosedResourceError:  # closed by us while waiting
            return False

    def _reset(self) -> None:
        """Close the connection with a reset (RST), now: the peer reads ECONNRESET."""
        with contextlib.suppress(OSError):  # Already gone: closing is all that is left.
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._socket.close()

    async def abort(self) -> None:
        """Reset the connection: the peer reads ECONNRESET instead of a response.

        hypercorn's read loop then sees the stream closed and tells the app
        ``http.disconnect``; anything the app sends afterwards is dropped.
        """
        self._reset()
        await trio.lowlevel.checkpoint()


class _KeepAlive:
    """Stands in for hypercorn's idle task (a ``TrioSingleTask``) on a :class:`_Connection`.

    hypercorn stops its idle task when a request starts and starts a new one, through
    ``nursery.start``, when the response ends: a task spawned and reaped per request,
    and one more task per idle connection. Here ``restart`` and ``stop`` only move the
    idle deadline of the connection (see ``_IdleConnections``).
    """

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def restart(self, task_group: object, action: object) -> None:
        """The connection is idle from now on (hypercorn's own timer, ``action``, is not used)."""
        self._connection.idle_from_now()

    async def stop(self) -> None:
        """A request is in progress."""
        self._connection.busy()


class _IdleConnections:
    """Closes the connections that stay idle past their deadline: one task for a server's
    connections, instead of a cancel scope around every wait for a client's bytes.

    A connection becomes idle, with a deadline ``keep_alive_timeout`` away, when it
    opens and whenever a response ends, and is watched from then (one entry at most per
    connection). When its entry is due, a connection that has been busy meanwhile is
    watched again to its current deadline; one still idle is closed if its read loop
    is waiting with no bytes arrived (see ``_Connection.close_if_waiting``). Entries
    refer to their connections weakly: a connection that ends is not kept for its entry.

    Every deadline is ``keep_alive_timeout`` from when it was set, so an entry added is
    never due before those already here; shutdown (a deadline of minus infinity) does
    not come through here.
    """

    def __init__(self) -> None:
        self._due: list[tuple[float, int, weakref.ref[_Connection]]] = []
        self._order = itertools.count()
        self._added = trio.Event()

    def watch(self, connection: _Connection, deadline: float) -> None:
        heappush(self._due, (deadline, next(self._order), weakref.ref(connection)))
        self._added.set()

    async def run(self) -> None:
        """Close idle connections as their deadlines pass, until cancelled."""
        due = self._due
        while True:
            if not due:
                self._added = trio.Event()
                await self._added.wait()
                continue
            await trio.sleep_until(due[0][0])
            now = trio.current_time()
            while due and due[0][0] <= now:
                self._check(heappop(due)[2], now)

    def _check(self, ref: weakref.ref[_Connection], now: float) -> None:
        # A function of its own, so that no frame of ``run`` keeps the connection.
        connection = ref()
        if connection is not None:
            deadline = connection.idle_deadline_passed(now)
            if deadline is not None:
                self.watch(connection, deadline)


def _readable_now(sock: trio.socket.SocketType) -> bool:
    """Whether ``sock`` has bytes, an end of stream or an error to read right now."""
    fileno = sock.fileno()
    if fileno < 0:
        return True  # closed: the read loop finds out itself
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))
