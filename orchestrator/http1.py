"""HTTP/1.1 for hypercorn's trio worker, parsed by llhttp (``httptools``) instead of h11.

:class:`Http1Protocol` stands in for hypercorn's ``H11Protocol`` on a connection (see
``hosting._Connection``): same constructor, same ``handle`` and ``stream_send``, the
same hypercorn ``HTTPStream`` between it and the app, so ASGI behaves exactly as under
hypercorn. What changes is the codec. h11 validated every response header twice and
ran a state machine per event: about a fifth of a small request's CPU in the gateway
and in the mock. Here llhttp (the C parser Node.js uses) parses the request, and the
response is framed directly:

- a body with ``Content-Length`` is sent as is, and must be exactly that long (a send
  past it, or an end short of it, raises ``LocalProtocolError`` to the app, and the
  connection closes after the response);
- without one, an HTTP/1.1 client gets ``Transfer-Encoding: chunked`` and an HTTP/1.0
  client a body that ends when the connection closes;
- no body for ``HEAD``, 1xx, 204 and 304;
- ``Connection: close`` when the request asked for it, the client is HTTP/1.0, the app
  sent it, or the connection has served ``keep_alive_max_requests``.

Requests are held to what h11 allowed: a head over ``h11_max_incomplete_size`` gets 431,
a malformed one 400 (request smuggling shapes included: ``Content-Length`` with
``Transfer-Encoding``, two lengths; an HTTP/1.1 request without ``Host``), a request
line of another version 505, a method llhttp does not know or a transfer coding
other than ``chunked`` 501, each with a body in OpenAI's error shape, and each then
closes the connection. ``Expect: 100-continue``
is answered at once. Pipelined requests wait, unread, until the response before them
ends, and the socket is not read meanwhile.

Protocol switches are hypercorn's: when a connection's first request asks to upgrade
(``h2c``, WebSocket, ``CONNECT``) or opens with HTTP/2's preface, the connection is
handed, with every byte it has sent, to hypercorn's own ``H11Protocol``, which serves it
from there exactly as before. A later request on a kept-alive connection that asks to
upgrade is answered as a plain request (RFC 9110 lets a server ignore ``Upgrade``).
"""

from __future__ import annotations

import http
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import (
    Body,
    Data,
    EndBody,
    InformationalResponse,
    Request,
    Response,
    StreamClosed,
)
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.typing import AppWrapper, ConnectionState, TaskGroup, WorkerContext

from orchestrator.appqueue import AppQueue, AppSpawner

__all__ = ["Http1Protocol", "LocalProtocolError"]

STREAM_ID = 1

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
#: Control characters other than tab: never in a header value (CR and LF split heads).
_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: What a refused request is told, in OpenAI's error shape like every error here.
_REFUSALS = {
    status: json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                  "code": None}}).encode()
    for status, message in (
        (400, "The request is not valid HTTP/1.1."),
        (431, "The request's head is larger than this server accepts."),
        (501, "The request's method or transfer coding is not one this server implements."),
        (505, "This server speaks HTTP/1.0 and HTTP/1.1 (and HTTP/2 after an upgrade or its preface)."),
    )
}
#: Header names already checked to be tokens (apps send the same few over and over).
_valid_names: set[bytes] = set()


class LocalProtocolError(Exception):
    """The app asked for a response HTTP/1.1 cannot carry (the message says why)."""


class _HeadTooLarge(Exception):
    """Raised inside a parser callback: the request head is over the limit."""


class _Framing:
    """How a response's body goes on the wire."""

    NONE = 0  # no body (HEAD, 1xx, 204, 304): body pieces are dropped
    LENGTH = 1  # Content-Length: exactly that many bytes
    CHUNKED = 2  # Transfer-Encoding: chunked
    UNTIL_CLOSE = 3  # HTTP/1.0 client, no length: the body ends with the connection


class _RequestHead:
    __slots__ = ("headers", "keep_alive", "method", "target", "version")

    def __init__(self, method: str, target: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive


class _BadRequest:
    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


class _Resume:
    """Parse these bytes with a fresh parser (what followed an ignored upgrade)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


_END = object()  # the request's body is complete
_HAND_OVER = object()  # a protocol switch on the connection's first request


class Http1Protocol:
    """One HTTP/1.1 connection: parses requests, serves each through an ``HTTPStream``,
    frames the responses. hypercorn's ``ProtocolWrapper`` calls ``handle`` with what the
    socket delivered (from the connection's read loop, so the socket is not read while
    ``handle`` blocks) and the stream calls ``stream_send``. Neither spawns a task.

    ``handle`` blocks while a pipelined request waits for the response before it, and
    while the app is slow to take its body (its request's ``AppQueue`` is bounded).
    """

    # One per connection, so kept small: slots, not a dict of some thirty attributes.
    __slots__ = (
        "_after_last_request", "_closed", "_cycle_end_waiter", "_cycle_running", "_delivering",
        "_fallback", "_framing", "_head_bytes", "_head_fed", "_headers", "_in_head", "_in_message",
        "_keep_alive", "_keep_alive_asked", "_max_head", "_method", "_must_close", "_parsed", "_parser",
        "_preamble", "_remaining",
        "_requests_parsed", "_response_complete", "_spawner", "_target", "_version", "app",
        "client", "config", "connection_state", "context", "keep_alive_requests", "send",
        "server", "ssl", "stream", "task_group",
    )

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        task_group: TaskGroup,
        connection_state: ConnectionState,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.task_group = task_group
        self._spawner = AppSpawner(task_group)  # each request's messages on an AppQueue
        self.connection_state = connection_state
        self.ssl = ssl
        self.client = client
        self.server = server
        self.send = send
        self._max_head = config.h11_max_incomplete_size
        # Made when bytes arrive, dropped once they end on a message's end: a connection
        # that waits (idle, or for its request's answer) holds none. About 0.9 KiB each,
        # the parser and the bound methods it keeps, where 500 requests in flight cost
        # some 40 KiB apiece; making one costs under a microsecond.
        self._parser: httptools.HttpRequestParser | None = None
        self._parsed: list[Any] = []  # a list: a deque's first block alone is 600 bytes
        # Every byte received until the first request is served: what a protocol
        # switch hands to hypercorn's H11Protocol.
        self._preamble: bytearray | None = bytearray()
        self._fallback: H11Protocol | None = None
        self.keep_alive_requests = 0  # requests started (hypercorn's name)
        self._requests_parsed = 0  # requests received whole
        self._delivering: HTTPStream | None = None  # the stream the read loop is delivering to
        self._closed = False
        # Whether a request is being served: the next one waits for its end. An Event
        # for that wait is made only when one is needed (a pipelined request): a trio
        # Event with its parking lot is about 0.4 KiB that a request in flight would hold.
        self._cycle_running = False
        self._cycle_end_waiter: trio.Event | None = None
        self._start_cycle()
        # The head being parsed.
        self._in_message = False  # between llhttp's message-begin and message-complete
        self._in_head = False
        self._head_bytes = 0  # the head's parsed pieces
        self._head_fed = 0  # bytes fed in later pieces while it was incomplete
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._keep_alive_asked = True
        self._after_last_request = False  # a request that closes the connection has ended

    def _start_cycle(self) -> None:
        self.stream: HTTPStream | None = None
        self._method = "GET"
        self._version = "1.1"
        self._keep_alive = True
        self._framing: int | None = None  # None until the response's head is sent
        self._remaining = 0
        self._response_complete = False
        self._must_close = False

    async def initiate(self) -> None:
        pass

    # -- reading -----------------------------------------------------------------------

    async def handle(self, event: Event) -> None:
        if self._fallback is not None:
            await self._fallback.handle(event)
        elif isinstance(event, RawData):
            if event.data and not self._closed:  # b"" is the end of the stream: Closed follows
                if self._preamble is not None:
                    self._preamble += event.data
                self._feed(event.data)
                if self._preamble is not None and not self._in_message and not self._parsed:
                    # llhttp passed over all of it: empty lines before a first request,
                    # which no size limit sees. Kept, a client sending nothing else
                    # would grow this buffer by as much as it could send.
                    self._preamble.clear()
                await self._handle_parsed()
        elif isinstance(event, Closed):
            self._closed = True
            self._parsed.clear()
            # The parser calls this protocol's methods: a reference cycle, which would
            # keep the whole connection for the cyclic collector (see hosting._Connection.run).
            self._parser = None
            if self.stream is not None:
                await self._close_stream()
            self._end_cycle()

    def _feed(self, data: bytes) -> None:
        """Parse ``data``; what it holds is queued on ``self._parsed``."""
        if self._in_head:
            # llhttp buffers a header line until it ends: this bounds one that trickles.
            self._head_fed += len(data)
            if self._head_fed > self._max_head:
                self._parsed.append(_BadRequest(431))
                return
        if self._parser is None:
            self._parser = httptools.HttpRequestParser(self)
        try:
            self._parser.feed_data(data)
            if not self._in_message and not self._after_last_request:
                # Nothing of a message is buffered: a new parser starts where this one
                # stands. After a request that closes the connection, this one stays:
                # it refuses what follows (see HttpParserError below).
                self._parser = None
        except httptools.HttpParserUpgrade as upgrade:
            if self._preamble is not None:
                # No request served yet, so all that is queued came from this data.
                self._parsed.clear()
                self._parsed.append(_HAND_OVER)
            else:
                self._parsed.append(_Resume(data[upgrade.args[0]:]))
        except httptools.HttpParserInvalidMethodError:
            self._parsed.append(_BadRequest(501))
        except httptools.HttpParserCallbackError as error:
            self._parsed.append(_BadRequest(431 if isinstance(error.__context__, _HeadTooLarge) else 400))
        except httptools.HttpParserError:
            if self._preamble is not None and self._preamble.startswith(b"PRI * HTTP/2.0"):
                self._parsed.clear()
                self._parsed.append(_HAND_OVER)  # HTTP/2 with prior knowledge
            elif self._after_last_request:
                pass  # bytes after a request that closes the connection: never read
            else:
                self._parsed.append(_BadRequest(400))

    async def _handle_parsed(self) -> None:
        parsed = self._parsed
        while parsed and not self._closed:
            item = parsed.pop(0)
            if isinstance(item, bytes) or item is _END:
                # The body of a request already answered is dropped (stream is None).
                stream = self._delivering = self.stream
                if stream is not None:
                    try:
                        if item is _END:
                            await stream.handle(EndBody(stream_id=STREAM_ID))
                        elif parsed and parsed[0] is _END and not stream.closed:
                            # The body's last piece and its end in one message, as
                            # HTTPStream would send them in two: the app reads the body
                            # at once, in one wake-up instead of two.
                            del parsed[0]
                            await stream.app_put({"type": "http.request", "body": item, "more_body": False})
                        else:
                            await stream.handle(Body(stream_id=STREAM_ID, data=item))
                    finally:
                        self._delivering = None
            elif isinstance(item, _RequestHead):
                if not await self._previous_cycle_ended():
                    return
                await self._start_request(item)
            elif isinstance(item, _Resume):
                self._parser = None  # past the upgrade request, a fresh one parses the rest
                self._in_message = False
                self._feed(item.data)
            elif item is _HAND_OVER:
                await self._hand_over()
                return
            else:
                # A bad request after one whose body is complete (pipelined) waits for
                # that one's answer; a bad body cuts its own request short.
                if self._request_received and not await self._previous_cycle_ended():
                    return
                await self._refuse(item.status)
                return

    @property
    def _request_received(self) -> bool:
        """Whether the request being served has arrived whole (its app may not have
        read it all: what it left is dropped, and the connection can serve the next)."""
        return self._requests_parsed >= self.keep_alive_requests

    async def _previous_cycle_ended(self) -> bool:
        """Wait for the current response to end; False if the connection closes instead.

        Not a checkpoint when it has already ended (``Event.wait`` always is): the
        request served next has one on its way to the app (see ``_start_request``).
        """
        if self._cycle_running:
            if self._cycle_end_waiter is None:
                self._cycle_end_waiter = trio.Event()
            await self._cycle_end_waiter.wait()
        return not self._closed

    def _end_cycle(self) -> None:
        self._cycle_running = False
        waiter, self._cycle_end_waiter = self._cycle_end_waiter, None
        if waiter is not None:
            waiter.set()

    async def _start_request(self, head: _RequestHead) -> None:
        self._preamble = None  # served here: no protocol switch from now on
        self._cycle_running = True
        self._start_cycle()
        self._method = head.method
        self._version = head.version
        self._keep_alive = head.keep_alive
        if head.version not in ("1.0", "1.1"):  # llhttp also reads 0.9 (no version) and 2.0 lines
            await self._refuse(505)
            return
        expects_continue = False
        has_host = False
        for name, value in head.headers:
            if name == b"transfer-encoding" and value.lower() != b"chunked":
                await self._refuse(501)  # llhttp would pass the body on still coded
                return
            expects_continue = expects_continue or (name == b"expect" and value.lower() == b"100-continue")
            has_host = has_host or name == b"host"
        if not has_host and head.version == "1.1":
            await self._refuse(400)  # RFC 9112 3.2: an HTTP/1.1 request without Host must get a 400
            return
        await self.send(Updated(idle=False))
        stream = self.stream = HTTPStream(
            self.app,
            self.config,
            self.context,
            self._spawner,
            self.ssl,
            self.client,
            self.server,
            self.stream_send,
            STREAM_ID,
        )
        await stream.handle(
            Request(
                stream_id=STREAM_ID,
                headers=head.headers,
                http_version=head.version,
                method=head.method,
                raw_path=head.target,
                state=self.connection_state,
            )
        )
        if stream.closed:
            # Answered without an app (hypercorn's 404 for a server name not served):
            # no message on an AppQueue, whose send is this read loop's checkpoint, so
            # one here. Without it, a client pipelining such requests would keep the
            # loop from yielding for as long as it kept sending.
            await trio.lowlevel.checkpoint()
        self.keep_alive_requests += 1
        await self.context.mark_request()
        if expects_continue and head.version == "1.1" and self._framing is None:
            await self.send(RawData(data=_CONTINUE))

    async def _refuse(self, status: int) -> None:
        """Answer a request we cannot parse or serve, and close the connection."""
        self._parsed.clear()
        if self._framing is None:  # no response has begun on this cycle
            body = _REFUSALS[status]
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                       (b"connection", b"close")]
            await self.send(RawData(data=_head(status, headers, self.config) + body))
        self._closed = True
        self._end_cycle()
        await self.send(Closed())

    async def _hand_over(self) -> None:
        """Serve this connection with hypercorn's H11Protocol from its first byte on."""
        data, self._preamble = bytes(self._preamble or b""), None
        self._parsed.clear()
        self._parser = None  # H11Protocol parses from here on (and see ``handle``'s Closed)
        self._fallback = H11Protocol(self.app, self.config, self.context, self.task_group, self.connection_state,
                                     self.ssl, self.client, self.server, self.send)
        await self._fallback.handle(RawData(data=data))

    # llhttp's callbacks, during feed_data: they only record.

    def on_message_begin(self) -> None:
        self._in_message = self._in_head = True
        self._after_last_request = False
        self._head_bytes = self._head_fed = 0
        self._target = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._headers.append((name.lower(), value.rstrip(b" \t")))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._max_head:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version()
        # HTTP/1.0 closes after each response, as under h11, even if it asks to keep alive.
        self._keep_alive_asked = keep_alive = version == "1.1" and parser.should_keep_alive()
        self._parsed.append(_RequestHead(parser.get_method().decode("ascii"), self._target, version, self._headers,
                                         keep_alive))

    def on_body(self, body: bytes) -> None:
        self._parsed.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._requests_parsed += 1
        self._parsed.append(_END)
        self._after_last_request = not self._keep_alive_asked

    # -- writing -----------------------------------------------------------------------

    async def stream_send(self, event: Event) -> None:
        if self._closed:
            return
        if isinstance(event, Body):
            await self._send_body(event.data)
        elif isinstance(event, Response):
            if event.status_code < 200:
                await self.send(RawData(data=_head(event.status_code, event.headers, self.config)))
            else:
                await self._send_head(event.status_code, event.headers)
        elif isinstance(event, EndBody):
            await self._end_body()
        elif isinstance(event, StreamClosed):
            await self._maybe_recycle()
        elif isinstance(event, (InformationalResponse, Data)):
            pass  # early hints are HTTP/2 only; Data is WebSocket only, never here

    async def _send_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._framing is not None:
            raise LocalProtocolError("a response has already begun")
        close = not self._keep_alive or self.keep_alive_requests >= self.config.keep_alive_max_requests
        length: int | None = None
        framed: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                if not value.isdigit() or length is not None:
                    raise LocalProtocolError(f"bad Content-Length: {value!r}")
                length = int(value)
                continue  # written once, below
            elif lowered == b"transfer-encoding":
                continue  # the framing is ours to choose
            elif lowered == b"connection" and b"close" in value.lower():
                close = True
                continue  # written once, below
            framed.append((name, value))
        if length is not None:
            framed.append((b"content-length", b"%d" % length))
        if self._method == "HEAD" or status in (204, 304):
            framing = _Framing.NONE
        elif length is not None:
            framing = _Framing.LENGTH
        elif self._version == "1.1":
            framing = _Framing.CHUNKED
            framed.append((b"transfer-encoding", b"chunked"))
        else:
            framing = _Framing.UNTIL_CLOSE
            close = True
        if close:
            framed.append((b"connection", b"close"))
        head = _head(status, framed, self.config)
        self._framing = framing
        self._remaining = length or 0
        self._must_close = close
        await self.send(RawData(data=head))

    async def _send_body(self, data: bytes) -> None:
        framing = self._framing
        if framing is None or self._response_complete:
            raise LocalProtocolError("a body piece outside a response")
        if framing == _Framing.CHUNKED:
            await self.send(RawData(data=b"%x\r\n%b\r\n" % (len(data), data)))
        elif framing == _Framing.LENGTH:
            if len(data) > self._remaining:
                self._must_close = True
                raise LocalProtocolError("Too much data for declared Content-Length")
            self._remaining -= len(data)
            await self.send(RawData(data=data))
        elif framing == _Framing.UNTIL_CLOSE:
            await self.send(RawData(data=data))

    async def _end_body(self) -> None:
        framing = self._framing
        if framing is None or self._response_complete:
            raise LocalProtocolError("the end of a body outside a response")
        if framing == _Framing.LENGTH and self._remaining:
            self._must_close = True
            raise LocalProtocolError("Too little data for declared Content-Length")
        self._response_complete = True
        if framing == _Framing.CHUNKED:
            await self.send(RawData(data=b"0\r\n\r\n"))

    async def _maybe_recycle(self) -> None:
        await self._close_stream()
        if (
            self._response_complete
            and self._request_received
            and not _waiting_for_room(self._delivering)
            and not self._must_close
            and not self.context.terminated.is_set()
        ):
            self._start_cycle()
            self._end_cycle()
            await self.send(Updated(idle=True))
        else:
            self._closed = True
            self._end_cycle()
            await self.send(Closed())

    async def _close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is None:
            return
        queue = _app_queue(stream)
        if queue is not None and queue.full:
            # The app stopped taking messages: ``http.disconnect`` would wait for room
            # forever, and this runs in the app's own last send.
            stream.closed = True
        else:
            await stream.handle(StreamClosed(stream_id=STREAM_ID))


def _app_queue(stream: HTTPStream) -> AppQueue | None:
    """The queue of a request's ASGI messages (``app_put`` is its ``send``)."""
    queue = getattr(stream.app_put, "__self__", None)
    return queue if isinstance(queue, AppQueue) else None


def _waiting_for_room(stream: HTTPStream | None) -> bool:
    """Whether the read loop is parked delivering to ``stream`` because the app stopped
    taking its body (the request's queue is full): it would never wake, so the
    connection must close rather than serve another request."""
    if stream is None:
        return False
    queue = _app_queue(stream)
    return queue is None or queue.senders_waiting > 0


def _head(status: int, headers: list[tuple[bytes, bytes]], config: Config) -> bytes:
    """A response's status line and headers, with hypercorn's own (``Date``, ...) added.

    Raises ``LocalProtocolError`` for a header that would corrupt the head: a name that
    is not a token, or a value with CR, LF or another control character.
    """
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b""))]
    for name, value in (*headers, *config.response_headers("h11")):
        if name not in _valid_names:
            if _TOKEN.fullmatch(name) is None:
                raise LocalProtocolError(f"invalid response header name: {name!r}")
            if len(_valid_names) < 1024:
                _valid_names.add(name)
        if _UNSAFE_VALUE.search(value) is not None:
            raise LocalProtocolError(f"invalid value for response header {name.decode('latin-1')!r}")
        lines.append(b"%b: %b\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)
