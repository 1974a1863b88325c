"""Upstream HTTP clients for one provider: httpx clients over a lean HTTP/1.1 transport.

The actor speaks httpx (``client.post``, ``client.build_request``,
``client.send(stream=True)``, ``response.aiter_bytes()``, ``aclose``) to an
:class:`UpstreamClient`, an ``AsyncClient`` whose ``send`` skips the auth, redirect,
hook and cookie handling it never needs. Underneath,
:class:`LeanTransport` replaces httpcore's connection pool, which the gateway's profile
showed doing per-request bookkeeping over every pooled connection (DESIGN section 6),
a cancel scope per socket operation and two socket writes per request. Here a request
takes an idle connection from a stack (O(1)), goes out in one write, and its response
is parsed in place::

    client.post ──► LeanTransport.handle_async_request
                      │ slot (≤ max_connections in use; waits when all are busy)
                      │ idle stack of the origin ─ pop; stale (readable, expired)? close, pop again
                      │   empty: connect (TCP, TLS with the shared SSL context) under the
                      │          request's connect timeout
                      │ head + body in one write, straight to the socket when it takes them
                      │ a reused connection closed by the server with no byte of answer:
                      │   once more, on a new connection
                      v
                    status line and headers parsed ──► httpx.Response(stream=_Body)
                                                        │ Content-Length, chunked, or to EOF
                                                        v
                        body read to its end: connection back on the stack (keep-alive)
                        closed early, failed or cancelled: connection closed

Failures are httpx's own exceptions, as ``providers.classify`` expects: ``ConnectError``
and ``ConnectTimeout`` (no connection), ``WriteError`` (sending), ``ReadError`` (reset
while reading), ``RemoteProtocolError`` (closed before the answer was complete, or
not HTTP/1.x). The router is the only retry loop: the transport resends a request only
when the kept-alive connection it chose turns out to have been closed by the server,
with not one byte of answer (a server's idle timeout that crossed our reuse), and then
once, on a new connection; that connection's failures are the request's.
Read timeouts are left to the actor's trio cancel scopes; a cancelled request closes
its connection, so nothing half-read is ever reused. HTTP/1.1 only, no proxies.

Several shards (``ClientPool``) each have their own transport, as they had their own
httpcore pool; with O(1) checkout the shard count no longer matters for speed.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import AsyncIterator
from itertools import cycle
from typing import Any

import httpx
import trio

__all__ = ["ClientPool", "LeanTransport", "ResponseTooLarge", "UpstreamClient", "body_pieces"]


class ResponseTooLarge(httpx.RemoteProtocolError):
    """An answer read whole is longer than ``MAX_RESPONSE_BYTES`` (decoded)."""

#: Idle connections older than this are closed rather than reused (httpx's default).
KEEPALIVE_EXPIRY = 5.0
#: Longest response head, and longest chunk-size or trailer line, accepted.
MAX_HEAD_BYTES = 64 * 1024
MAX_LINE_BYTES = 8 * 1024
RECEIVE_BYTES = 64 * 1024
#: Largest answer read whole (``send`` without ``stream``), decoded. A chat completion
#: is kilobytes; an answer past this is the provider misbehaving, and reading it on
#: would hold the gateway's memory hostage to it.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORBIDDEN_IN_HEADERS = re.compile(rb"[\r\n\0]")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (.*))?")
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_shared_ssl_context: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _shared_ssl_context
    if _shared_ssl_context is None:
        _shared_ssl_context = ssl.create_default_context()
        _shared_ssl_context.set_alpn_protocols(["http/1.1"])
    return _shared_ssl_context


class ClientPool:
    """``shards`` httpx clients for one provider; :meth:`next` picks one, round robin.

    ``max_connections`` is shared out between the shards so the provider's concurrency
    limit, not the pool, is what refuses excess work. ``transport`` replaces the
    network (tests serve the mock app in-process); one transport then serves all shards.
    """

    def __init__(
        self,
        *,
        shards: int,
        max_connections: int,
        connect_timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        per_shard = max(1, -(-max_connections // shards))
        timeout = httpx.Timeout(None, connect=connect_timeout)
        self._clients: list[httpx.AsyncClient] = []
        self._transports: list[LeanTransport] = []
        for _ in range(shards):
            shard_transport = transport
            if shard_transport is None:
                shard_transport = LeanTransport(max_connections=per_shard)
                self._transports.append(shard_transport)
            self._clients.append(UpstreamClient(transport=shard_transport, timeout=timeout, trust_env=False))
        self._owns_transports = transport is None
        self._next = cycle(self._clients).__next__

    def next(self) -> httpx.AsyncClient:
        return self._next()

    def connections_replaced(self) -> int:
        """How many requests went out again on a new connection because the server had
        closed their kept-alive one as they went out (see ``LeanTransport``)."""
        return sum(transport.replaced for transport in self._transports)

    def close_stale(self) -> int:
        """Close the idle connections no longer worth keeping (see
        :meth:`LeanTransport.close_stale`); return how many. Never blocks."""
        return sum(transport.close_stale() for transport in self._transports)

    async def aclose(self) -> None:
        """Close every shard's connections (shielded: this runs during cancellation).

        An injected transport belongs to whoever injected it and is left open.
        """
        if not self._owns_transports:
            return
        with trio.CancelScope(shield=True):
            for client in self._clients:
                await client.aclose()


class UpstreamClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose ``send`` goes straight to its transport.

    ``ClientPool`` configures no auth, no redirects, no event hooks and no cookies,
    so ``send`` skips httpx's machinery for them (about a third of the upstream
    path's cost in the gateway's profile). Everything else is httpx's:
    ``build_request``, ``post``, ``send(stream=True)``, the ``Response`` and its
    ``aiter_bytes``/``aclose``; a body that needs no decoding is read by the transport
    in one piece, and ``body_pieces`` iterates one without httpx's layers. Asking
    ``send`` for auth or redirects is an error.
    """

    def __init__(self, *, transport: httpx.AsyncBaseTransport, **options: Any) -> None:
        super().__init__(transport=transport, **options)
        self._upstream = transport

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: object = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: object = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        """Send ``request``; read the body too unless ``stream`` (then the caller closes it).

        Blocks until the response head (and, without ``stream``, the body) is in.
        """
        if auth is not httpx.USE_CLIENT_DEFAULT or follow_redirects is not httpx.USE_CLIENT_DEFAULT:
            raise TypeError("UpstreamClient.send takes no auth and follows no redirects")
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self._upstream.handle_async_request(request)
        response.request = request
        if not stream:
            read = False
            try:
                body = response.stream
                if isinstance(body, _Body) and body.identity:
                    content = await body.read(MAX_RESPONSE_BYTES)
                else:  # httpx decodes what the server compressed
                    content = await _read_decoded(response, MAX_RESPONSE_BYTES)
                _mark_read(response, content)
                read = True
            finally:
                if not read:  # failed, cancelled or refused mid-body: the connection is not reusable
                    await response.aclose()
        return response


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive over trio streams: one write per request, O(1) checkout.

    At most ``max_connections`` requests are in flight at once; more wait (cancellably)
    for a slot. Idle connections are kept per origin, newest first.
    """

    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl_context = ssl_context
        self._closed = False
        #: Requests resent on a new connection: their kept-alive one was closed under them.
        self.replaced = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; return once the response head is in (the body streams).

        Blocks for a free slot, the connection, the write and the response head; a
        cancellation at any point closes the connection it was using.
        """
        if self._closed:
            raise RuntimeError("the transport is closed")
        payload = _serialize(request, await request.aread())
        try:
            # A free slot is taken without a trip through the scheduler (acquire() always
            # makes one): the request's write and the wait for its answer follow at once.
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        connection: _Connection | None = None
        body: _Body | None = None
        try:
            connection, reused = await self._connection(request)
            received = connection.received
            try:
                status, reason, headers, http_version = await connection.exchange(payload, request)
            except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
                if not reused or connection.received != received:
                    raise
                # The server closed this kept-alive connection as the request went out
                # (its idle timeout and our reuse crossed): it answered nothing. That
                # is the connection's failure, not the provider's, and the router would
                # back off and count it against the breaker; so once, on a new one.
                origin = connection.origin
                connection.close()
                connection = None  # if connecting fails, nothing is left to close
                self.replaced += 1
                connection = await _Connection.open(origin, request, self._ssl_context)
                status, reason, headers, http_version = await connection.exchange(payload, request)
            body = _Body(self, connection, request, status, headers, http_version)
        finally:
            if body is None:  # failed or cancelled before a response: give everything back
                if connection is not None:
                    connection.close()
                self._slots.release()
        return httpx.Response(
            status,
            headers=headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.%d" % http_version, "reason_phrase": reason},
        )

    def close_stale(self) -> int:
        """Close the idle connections that would not be reused: idle past
        ``KEEPALIVE_EXPIRY``, or closed by the server meanwhile. Returns how many.

        A connection is otherwise only looked at when a request takes it, so after a
        burst the pool would keep every connection of its peak -- each a file
        descriptor, most of them closed by the server and left in ``CLOSE_WAIT`` --
        until traffic came back. Never blocks.
        """
        now = trio.current_time()
        closed = 0
        for origin, stack in list(self._idle.items()):
            keep = []
            for connection in stack:
                if connection.reusable(now):
                    keep.append(connection)
                else:
                    connection.close()
                    closed += 1
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        return closed

    async def aclose(self) -> None:
        """Close the idle connections; connections still in use close when their response does."""
        self._closed = True
        for stack in self._idle.values():
            for connection in stack:
                connection.close()
        self._idle.clear()

    async def _connection(self, request: httpx.Request) -> tuple[_Connection, bool]:
        """The newest reusable idle connection to the request's origin (and True), or a
        new one (and False)."""
        origin = _origin(request)
        stack = self._idle.get(origin)
        now = trio.current_time()
        while stack:
            connection = stack.pop()
            if connection.reusable(now):
                return connection, True
            connection.close()
        return await _Connection.open(origin, request, self._ssl_context), False

    def _release(self, connection: _Connection, *, keep: bool) -> None:
        """A response is done with its connection: keep it for the next request or close it."""
        self._slots.release()
        if keep and not self._closed:
            connection.idle_since = trio.current_time()
            self._idle.setdefault(connection.origin, []).append(connection)
        else:
            connection.close()


def _origin(request: httpx.Request) -> tuple[str, str, int]:
    url = request.url
    if url.scheme not in _DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
    return url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme]


class _Connection:
    """One connection: its trio stream and the bytes received but not yet parsed."""

    def __init__(self, origin: tuple[str, str, int], stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.origin = origin
        self.stream = stream
        self.socket = socket
        self.cleartext = isinstance(stream, trio.SocketStream)
        self.buffer = bytearray()
        #: Bytes received over the connection's life: whether a request got any answer.
        self.received = 0
        self.idle_since = 0.0

    @classmethod
    async def open(
        cls, origin: tuple[str, str, int], request: httpx.Request, ssl_context: ssl.SSLContext | None
    ) -> _Connection:
        """Connect (and, for https, shake hands) within the request's connect timeout."""
        scheme, host, port = origin
        connect_timeout = request.extensions.get("timeout", {}).get("connect")
        stream: trio.abc.Stream | None = None
        with trio.move_on_after(connect_timeout if connect_timeout is not None else float("inf")) as scope:
            try:
                tcp = await trio.open_tcp_stream(host, port)
                stream = tcp
                if scheme == "https":
                    stream = trio.SSLStream(tcp, ssl_context or _ssl_context(), server_hostname=host,
                                            https_compatible=True)
                    await stream.do_handshake()
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as error:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error}", request=request) from None
        if scope.cancelled_caught or stream is None:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within {connect_timeout:g}s", request=request)
        return cls(origin, stream, tcp.socket)

    def reusable(self, now: float) -> bool:
        """Idle, fresh, and not closed by the server meanwhile (an idle socket that
        reads as ready has an EOF or stray bytes waiting: either way, unusable)."""
        return now - self.idle_since < KEEPALIVE_EXPIRY and not self.buffer and not self.socket.is_readable()

    def close(self) -> None:
        """Close at once, without a TLS goodbye (the connection may be mid-response)."""
        self.socket.close()

    async def send(self, data: bytes, request: httpx.Request) -> None:
        """Write ``data``. A cleartext request the socket takes whole (nearly every one)
        goes straight to it, without ``send_all``'s scopes and wake-ups; what it does
        not take, and anything over TLS, goes through ``send_all``. Like ``send_all``,
        raises ``Cancelled`` before writing anything if the caller's scope is cancelled.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            if self.cleartext:
                try:
                    data = data[os.write(self.socket.fileno(), data):]
                except BlockingIOError:
                    pass  # the send buffer is full: send_all waits for room
            if data:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise httpx.WriteError(f"connection lost while sending: {error}", request=request) from None

    async def receive(self, request: httpx.Request) -> bool:
        """Read more into the buffer; False at end of file.

        Over cleartext, bytes already waiting are read straight from the socket, without
        ``receive_some``'s context managers and trip through the scheduler (so it is not
        a checkpoint then: the caller's next wait is); otherwise it waits for some.
        """
        try:
            if self.cleartext:
                while True:
                    try:
                        data = os.read(self.socket.fileno(), RECEIVE_BYTES)
                        break
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(self.socket)
            else:
                data = await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise httpx.ReadError(f"connection lost while reading: {error}", request=request) from None
        self.buffer += data
        self.received += len(data)
        return bool(data)

    async def exchange(self, data: bytes, request: httpx.Request) -> tuple[int, bytes, list[tuple[bytes, bytes]], int]:
        """Send a request's bytes and read the head of its answer (see :meth:`read_head`)."""
        await self.send(data, request)
        return await self.read_head(request)

    async def read_head(self, request: httpx.Request) -> tuple[int, bytes, list[tuple[bytes, bytes]], int]:
        """The final response head: status, reason, headers, minor HTTP version (1xx skipped)."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            while end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("the response head is too large", request=request)
                if not await self.receive(request):
                    raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                                    request=request)
                end = self.buffer.find(b"\r\n\r\n")
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            status, reason, headers, http_version = _parse_head(head, request)
            if not 100 <= status < 200:
                return status, reason, headers, http_version

    async def read_line(self, request: httpx.Request) -> bytes:
        """One CRLF-terminated line of a chunked body, without its CRLF."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_LINE_BYTES:
                raise httpx.RemoteProtocolError("a chunk line is too long", request=request)
            if not await self.receive(request):
                raise httpx.RemoteProtocolError("peer closed connection inside a chunked body", request=request)
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection, which is released when the body ends.

    Iterating reads to the end of the body by its framing; the connection then goes
    back to the transport (or is closed, if the server asked or framing was "until
    close"). ``aclose`` before the end closes the connection instead.
    """

    def __init__(
        self,
        transport: LeanTransport,
        connection: _Connection,
        request: httpx.Request,
        status: int,
        headers: list[tuple[bytes, bytes]],
        http_version: int,
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._request = request
        self._length: int | None = None
        self._chunked = False
        self._keep_alive = http_version == 1
        #: No ``Content-Encoding`` (or only ``identity``): the bytes read are the body.
        self.identity = True
        transfer_encoding = b""
        lengths = set()
        for name, value in headers:
            name = name.lower()
            if name == b"connection" and b"close" in value.lower():
                self._keep_alive = False
            elif name == b"content-encoding":
                self.identity = self.identity and value.strip().lower() in (b"", b"identity")
            elif name == b"transfer-encoding":
                transfer_encoding = value.lower()
            elif name == b"content-length":
                lengths.update(part.strip() for part in value.split(b","))
        if request.method == "HEAD" or status in (204, 304):
            self._length = 0
        elif transfer_encoding:
            self._chunked = transfer_encoding.rsplit(b",", 1)[-1].strip() == b"chunked"
            self._keep_alive = self._keep_alive and self._chunked
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise httpx.RemoteProtocolError("invalid Content-Length in the response", request=request)
            self._length = int(next(iter(lengths)))
        else:
            self._keep_alive = False  # the body ends when the server closes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        request = self._request
        if self._chunked:
            while size := _chunk_size(await connection.read_line(request), request):
                if len(connection.buffer) >= size:  # the usual case: the chunk is in
                    piece = bytes(connection.buffer[:size])
                    del connection.buffer[:size]
                    yield piece
                else:
                    async for piece in self._exactly(connection, size):
                        yield piece
                if await connection.read_line(request) != b"":
                    raise httpx.RemoteProtocolError("a chunk does not end with CRLF", request=request)
            while await connection.read_line(request) != b"":
                pass  # trailers: read and dropped
        elif self._length is not None:
            async for piece in self._exactly(connection, self._length):
                yield piece
        else:
            while connection.buffer or await connection.receive(request):
                piece = bytes(connection.buffer)
                connection.buffer.clear()
                yield piece
        self._finish(keep=self._keep_alive and not connection.buffer)

    async def read(self, limit: int) -> bytes:
        """The whole body, read to its end as iterating would, in one piece.

        Raises :class:`ResponseTooLarge` once it is known to be over ``limit`` bytes (a
        ``Content-Length`` before any of it is read). A body of known length is taken
        from the connection's buffer once it is all in, without a generator per
        response (the common answer: a JSON completion).
        """
        connection = self._connection
        size = self._length
        if connection is None or size is None or self._chunked:
            return await _joined(self, limit, self._request)
        if size > limit:
            raise _too_large(limit, self._request)
        while len(connection.buffer) < size:
            if not await connection.receive(self._request):
                raise self._truncated(len(connection.buffer), size)
        content = bytes(connection.buffer[:size])
        del connection.buffer[:size]
        self._finish(keep=self._keep_alive and not connection.buffer)
        return content

    async def _exactly(self, connection: _Connection, size: int) -> AsyncIterator[bytes]:
        remaining = size
        while remaining:
            if not connection.buffer and not await connection.receive(self._request):
                raise self._truncated(size - remaining, size)
            piece = bytes(connection.buffer[:remaining])
            del connection.buffer[: len(piece)]
            remaining -= len(piece)
            yield piece

    def _truncated(self, received: int, expected: int) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(
            f"peer closed connection without sending complete message body:"
            f" received {received} bytes, expected {expected}",
            request=self._request,
        )

    async def aclose(self) -> None:
        self._finish(keep=False)

    def _finish(self, *, keep: bool) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self._transport._release(connection, keep=keep)


def body_pieces(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body of a ``send(stream=True)`` response, piece by piece as it arrives.

    A body the lean transport reads that needs no decoding is iterated directly,
    without httpx's two generator layers and decoder per piece (a stream has dozens
    of pieces); any other body goes through ``aiter_bytes``. Close the response after,
    as always.
    """
    body = response.stream
    if isinstance(body, _Body) and body.identity:
        return body.__aiter__()
    return response.aiter_bytes()


async def _read_decoded(response: httpx.Response, limit: int) -> bytes:
    """A compressed body, decoded by httpx, within ``limit`` decoded bytes.

    httpx decodes each network read whole before it is counted, so the bound can be
    passed by what one read inflates to (64 KiB of gzip: up to 64 MiB) before the
    body is refused.
    """
    return await _joined(response.aiter_bytes(), limit, response.request)


async def _joined(pieces: AsyncIterator[bytes] | _Body, limit: int, request: httpx.Request) -> bytes:
    received: list[bytes] = []
    size = 0
    async for piece in pieces:
        size += len(piece)
        if size > limit:
            raise _too_large(limit, request)
        received.append(piece)
    return b"".join(received)


def _too_large(limit: int, request: httpx.Request) -> ResponseTooLarge:
    return ResponseTooLarge(f"the answer is larger than the {limit} bytes read whole", request=request)


def _mark_read(response: httpx.Response, content: bytes) -> None:
    # What ``Response.aread`` leaves behind once it has read a body to its end: the
    # content kept, the stream consumed and closed (``_Body.read`` released it).
    response._content = content
    response.is_stream_consumed = True
    response.is_closed = True
    response._num_bytes_downloaded = len(content)


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    """The request's bytes on the wire: head and body, to go out in one write."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)]
    chunked = False
    for name, value in request.headers.raw:
        if _FORBIDDEN_IN_HEADERS.search(name) or _FORBIDDEN_IN_HEADERS.search(value):
            raise httpx.LocalProtocolError(f"invalid header {name!r}", request=request)
        if name.lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    if chunked:
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return b"".join(lines) + body


def _parse_head(head: bytes, request: httpx.Request) -> tuple[int, bytes, list[tuple[bytes, bytes]], int]:
    status_line, *header_lines = head.split(b"\r\n")
    matched = _STATUS_LINE.fullmatch(status_line)
    if matched is None:
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}", request=request)
    headers = []
    for line in header_lines:
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise httpx.RemoteProtocolError(f"malformed response header line: {line[:80]!r}", request=request)
        headers.append((name, value.strip(b" \t")))
    return int(matched.group(2)), matched.group(3) or b"", headers, int(matched.group(1))


def _chunk_size(line: bytes, request: httpx.Request) -> int:
    size = line.split(b";", 1)[0].strip()
    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
        raise httpx.RemoteProtocolError(f"invalid chunk size line: {line[:80]!r}", request=request)
    return int(size, 16)
