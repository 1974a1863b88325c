"""The lean upstream transport (``providers.pool``) against a scripted raw HTTP server.

Each test's server answers every request with bytes the test chose, so framing,
keep-alive, early closes and resets are exact; the server counts connections and
records what it received.
"""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

import providers.pool
from providers.pool import ClientPool, LeanTransport, ResponseTooLarge, UpstreamClient, body_pieces
from rawserver import Answer, Server, reply, serving
from scheduling import counting_suspensions

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


@asynccontextmanager
async def client(max_connections: int = 8) -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient(transport=LeanTransport(max_connections=max_connections),
                              timeout=httpx.Timeout(None, connect=5.0)) as upstream:
        yield upstream


async def test_one_write_per_request_and_keep_alive_reuse():
    async with serving(reply(OK)) as server, client() as upstream:
        for _ in range(3):
            response = await upstream.post(f"{server.url}/v1/chat?x=1", content=b'{"a":1}',
                                           headers={"authorization": "Bearer k"})
            assert response.status_code == 200
            assert response.json() == {"ok": True}
            assert response.headers["content-type"] == "application/json"
            assert response.http_version == "HTTP/1.1"
        assert server.connections == 1
        request = server.received[0]
        assert request.startswith(b"POST /v1/chat?x=1 HTTP/1.1\r\n")
        assert b"\r\nauthorization: Bearer k\r\n" in request
        assert request.endswith(b'\r\n\r\n{"a":1}')


async def test_a_request_larger_than_the_socket_takes_at_once_arrives_whole():
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB: part goes straight out, the rest by send_all
    async with serving(reply(OK)) as server, client() as upstream:
        assert (await upstream.post(server.url, content=body)).status_code == 200
        assert server.received[0].endswith(b"\r\n\r\n" + body)


async def test_a_chunked_stream_arrives_piece_by_piece_with_extensions_and_trailers():
    pieces = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n",
        b"7;ext=1\r\ndata: 1\r\n",
        b"7\r\ndata: 2\r\n",
        b"0\r\nx-trailer: yes\r\n\r\n",
    )
    async with serving(reply(*pieces)) as server, client() as upstream:
        request = upstream.build_request("POST", f"{server.url}/stream", content=b"{}")
        response = await upstream.send(request, stream=True)
        try:
            body = b"".join([piece async for piece in response.aiter_bytes()])
        finally:
            await response.aclose()
        assert body == b"data: 1data: 2"
        assert (await upstream.post(f"{server.url}/again", content=b"{}")).status_code == 200
        assert server.connections == 1  # the chunked body ended cleanly: reused


async def test_a_body_without_length_runs_to_the_close_and_is_not_reused():
    answer = reply(b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end", close=True)
    async with serving(answer) as server, client() as upstream:
        assert (await upstream.post(server.url, content=b"")).content == b"until the end"
        assert (await upstream.post(server.url, content=b"")).content == b"until the end"
        assert server.connections == 2


async def test_connection_close_is_honoured():
    answer = reply(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi")
    async with serving(answer) as server, client() as upstream:
        for _ in range(2):
            assert (await upstream.post(server.url, content=b"")).text == "hi"
        assert server.connections == 2


async def test_interim_responses_are_skipped():
    async with serving(reply(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server, client() as upstream:
        assert (await upstream.post(server.url, content=b"")).status_code == 200


async def test_an_error_status_is_a_response_not_an_exception():
    answer = reply(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: 4\r\n\r\nbusy")
    async with serving(answer) as server, client() as upstream:
        response = await upstream.post(server.url, content=b"")
        assert (response.status_code, response.headers["retry-after"], response.text) == (503, "2", "busy")
        assert response.reason_phrase == "Service Unavailable"


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (reply(close=True), httpx.RemoteProtocolError, "Server disconnected without sending a response"),
        (reply(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", close=True), httpx.RemoteProtocolError,
         "received 3 bytes, expected 10"),
        (reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab", close=True),
         httpx.RemoteProtocolError, "peer closed connection"),
        (reply(b"SPDY/3 200 OK\r\n\r\n"), httpx.RemoteProtocolError, "not an HTTP/1.x status line"),
        (reply(b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n"), httpx.RemoteProtocolError, "malformed response header"),
        (reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n"), httpx.RemoteProtocolError, "Content-Length"),
        (reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"), httpx.RemoteProtocolError,
         "invalid chunk size"),
    ],
)
async def test_broken_answers_raise_what_classify_expects(answer, error, message):
    async with serving(answer) as server, client() as upstream:
        with pytest.raises(error, match=message):
            await upstream.post(server.url, content=b"")


async def test_a_reset_is_a_read_error():
    async def reset(stream: trio.SocketStream, request: bytes) -> None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async with serving(reset) as server, client() as upstream:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await upstream.post(server.url, content=b"")


async def test_a_refused_connection_is_a_connect_error():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with client() as upstream:
        with pytest.raises(httpx.ConnectError):
            await upstream.post(f"http://127.0.0.1:{port}/", content=b"")


async def test_a_connection_that_never_comes_is_a_connect_timeout(monkeypatch, autojump_clock):
    async def never(*args: object, **kwargs: object) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio, "open_tcp_stream", never)
    async with client() as upstream:
        with pytest.raises(httpx.ConnectTimeout):
            await upstream.post("http://127.0.0.1:9/", content=b"")


async def test_a_cancelled_request_closes_its_connection():
    stalled = trio.Event()
    stalled_requests: list[bytes] = []

    async def head_then_stall(stream: trio.SocketStream, request: bytes) -> None:
        if len(stalled_requests) == 0:
            stalled_requests.append(request)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            stalled.set()
            await trio.sleep_forever()
        await stream.send_all(OK)

    async with serving(head_then_stall) as server, client() as upstream:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(upstream.post, server.url, content=b""))
                await stalled.wait()
                scope.cancel()
        assert (await upstream.post(server.url, content=b"")).status_code == 200
        assert server.connections == 2  # the half-read connection was not reused


async def test_an_idle_connection_the_server_closed_is_not_reused():
    async with serving(reply(OK, close=True)) as server, client() as upstream:
        assert (await upstream.post(server.url, content=b"")).status_code == 200
        with trio.fail_after(5):
            while server.open_connections:  # wait for the server's close to land
                await trio.sleep(0.01)
        assert (await upstream.post(server.url, content=b"")).status_code == 200
        assert server.connections == 2


def closing_on_request(number: int, *, reset: bool = False, first_bytes: bytes = b"") -> Answer:
    """Answer ``OK``, except that each connection's ``number``-th request is met with
    ``first_bytes`` (none by default) and a close -- or a reset -- as a server whose idle
    timeout crosses the client's reuse of the connection does."""
    served: dict[trio.SocketStream, int] = {}

    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        served[stream] = served.get(stream, 0) + 1
        if served[stream] < number:
            await stream.send_all(OK)
            return
        if first_bytes:
            await stream.send_all(first_bytes)
        if reset:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    return answer


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_kept_alive_connection_closed_as_the_request_arrives_is_replaced_once(reset):
    async with serving(closing_on_request(2, reset=reset)) as server, client() as upstream:
        assert (await upstream.post(server.url, content=b"first")).status_code == 200
        response = await upstream.post(server.url, content=b"second")
        assert (response.status_code, response.json()) == (200, {"ok": True})
        assert server.connections == 2
        assert [request.rsplit(b"\r\n", 1)[-1] for request in server.received] == [b"first", b"second", b"second"]


async def test_the_pool_counts_the_connections_it_replaced():
    pool = ClientPool(shards=2, max_connections=4, connect_timeout=5.0)
    try:
        async with serving(closing_on_request(2)) as server:
            for _ in range(4):  # each shard: a new connection, then one closed under its request
                assert (await pool.next().post(server.url, content=b"")).status_code == 200
        assert pool.connections_replaced() == 2
    finally:
        await pool.aclose()


async def test_the_new_connection_is_tried_once_and_its_failure_is_the_requests():
    async with serving(closing_on_request(1)) as server, client() as upstream:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await upstream.post(server.url, content=b"")  # a new connection: not retried
        assert server.connections == 1
    async with serving(closing_on_request(2)) as server, client() as upstream:
        assert (await upstream.post(server.url, content=b"")).status_code == 200
        server.answer = closing_on_request(1)  # from now on every request is cut
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await upstream.post(server.url, content=b"")
        assert server.connections == 2  # the reused one, and one more


async def test_a_kept_alive_connection_that_began_an_answer_is_not_replaced():
    cut_head = closing_on_request(2, first_bytes=b"HTTP/1.1 200 OK\r\ncontent-le")
    async with serving(cut_head) as server, client() as upstream:
        assert (await upstream.post(server.url, content=b"")).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await upstream.post(server.url, content=b"")
        assert server.connections == 1


async def test_close_stale_closes_the_idle_connections_that_would_not_be_reused(autojump_clock):
    transport = LeanTransport(max_connections=8)
    async with serving(reply(OK)) as keeping, serving(reply(OK, close=True)) as closing, \
            UpstreamClient(transport=transport, timeout=httpx.Timeout(None, connect=5.0)) as upstream:
        for server in (keeping, closing):
            assert (await upstream.post(server.url, content=b"")).status_code == 200
        with trio.fail_after(5):
            while closing.open_connections:  # the server's close lands
                await trio.sleep(0.01)
        assert transport.close_stale() == 1  # closed by its server: ours goes too
        await trio.sleep(1)
        assert transport.close_stale() == 0 and keeping.open_connections == 1
        await trio.sleep(providers.pool.KEEPALIVE_EXPIRY)
        assert transport.close_stale() == 1  # idle past the expiry
        with trio.fail_after(5):
            while keeping.open_connections:
                await trio.sleep(0.01)
        assert transport.close_stale() == 0
        assert (await upstream.post(keeping.url, content=b"")).status_code == 200
        assert keeping.connections == 2


async def test_requests_beyond_max_connections_wait_for_a_slot():
    async with serving(reply(OK)) as server, client(max_connections=2) as upstream:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(partial(upstream.post, server.url, content=b""))
        assert server.most_open <= 2
        assert len(server.received) == 6


async def test_a_request_with_a_free_slot_waits_only_for_its_answer():
    # Taking a free slot is not a trip through the scheduler: the request is written in
    # the step that sends it, and its task sleeps once, until the answer is in.
    async with serving(reply(OK)) as server, client() as upstream:
        await upstream.post(server.url, content=b"")  # the connection is open and idle now
        with counting_suspensions() as suspensions:
            assert (await upstream.post(server.url, content=b"")).status_code == 200
        assert suspensions.count == 1


async def test_a_stream_closed_early_gives_its_slot_back():
    endless = reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    async with serving(endless) as server, client(max_connections=1) as upstream:
        for _ in range(2):
            response = await upstream.send(upstream.build_request("POST", server.url, content=b""), stream=True)
            async for piece in response.aiter_bytes():
                assert piece == b"abc"
                break
            await response.aclose()
        assert server.connections == 2


@pytest.fixture
def httpx_reads(monkeypatch) -> list[httpx.Response]:
    """The responses whose body httpx read and decoded (``aiter_bytes``)."""
    reads: list[httpx.Response] = []
    original = httpx.Response.aiter_bytes

    def recording(self: httpx.Response, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        reads.append(self)
        return original(self, chunk_size)

    monkeypatch.setattr(httpx.Response, "aiter_bytes", recording)
    return reads


@pytest.mark.parametrize("encoding", [b"", b"content-encoding: identity\r\n"], ids=["none", "identity"])
async def test_a_body_read_whole_leaves_the_response_as_aread_would(httpx_reads, encoding):
    answer = reply(b"HTTP/1.1 200 OK\r\n" + encoding + b'content-length: 11\r\n\r\n{"ok":true}')
    async with serving(answer) as server, client() as upstream:
        response = await upstream.post(server.url, content=b"")
        assert not httpx_reads  # read by the transport, in one piece
        assert response.is_closed and response.is_stream_consumed
        assert response.content == await response.aread() == b'{"ok":true}'
        assert response.num_bytes_downloaded == 11
        await response.aclose()
        assert (await upstream.post(server.url, content=b"")).json() == {"ok": True}
        assert server.connections == 1


@pytest.mark.parametrize("encoding", [b"gzip", b"GZIP", b"identity, gzip"])
@pytest.mark.parametrize("chunked", [False, True])
async def test_a_compressed_body_is_decoded_whole_and_streamed(httpx_reads, chunked, encoding):
    packed = gzip.compress(b'{"ok":true}')
    framing = b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed) if chunked \
        else b"content-length: %d\r\n\r\n%s" % (len(packed), packed)
    answer = reply(b"HTTP/1.1 200 OK\r\ncontent-encoding: " + encoding + b"\r\n" + framing)
    async with serving(answer) as server, client() as upstream:
        assert (await upstream.post(server.url, content=b"")).json() == {"ok": True}
        assert len(httpx_reads) == 1  # through httpx, which decodes
        response = await upstream.send(upstream.build_request("POST", server.url, content=b""), stream=True)
        try:
            assert b"".join([piece async for piece in body_pieces(response)]) == b'{"ok":true}'
        finally:
            await response.aclose()


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until close", "gzip"])
async def test_an_answer_read_whole_is_refused_past_the_limit(monkeypatch, framing):
    monkeypatch.setattr(providers.pool, "MAX_RESPONSE_BYTES", 1000)
    body = b"x" * 1001
    answers = {
        "content-length": reply(b"HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\n"),  # refused unread
        "chunked": reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"258\r\n%s\r\n191\r\n%s\r\n0\r\n\r\n" % (body[:600], body[600:])),
        "until close": reply(b"HTTP/1.1 200 OK\r\n\r\n" + body, close=True),
        "gzip": reply(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
                      % (len(gzip.compress(body)), gzip.compress(body))),  # small packed, too large decoded
    }
    async with serving(answers[framing]) as server, client() as upstream:
        with trio.fail_after(5), pytest.raises(ResponseTooLarge, match="larger than the 1000 bytes"):
            await upstream.post(server.url, content=b"")
        if framing != "content-length":
            monkeypatch.setattr(providers.pool, "MAX_RESPONSE_BYTES", 10_000)
            assert (await upstream.post(server.url, content=b"")).content == body
            assert server.connections == 2  # the refused answer's connection was not reused


async def test_body_pieces_reads_an_uncompressed_stream_as_it_arrives():
    half_read = trio.Event()

    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\nde")
        await half_read.wait()  # the rest of the second chunk only once its start is out
        await stream.send_all(b"fg\r\n0\r\n\r\n")

    async with serving(answer) as server, client() as upstream:
        response = await upstream.send(upstream.build_request("POST", server.url, content=b""), stream=True)
        try:
            pieces = []
            async for piece in body_pieces(response):
                pieces.append(piece)
                if b"".join(pieces) == b"abcde":
                    half_read.set()
            assert b"".join(pieces) == b"abcdefg"
            assert (pieces[0], pieces[-1]) == (b"abc", b"fg")  # "de" came out before "fg" was sent
        finally:
            await response.aclose()
        assert (await upstream.post(f"{server.url}/again", content=b"")).status_code == 200
        assert server.connections == 1  # read to its end: the connection was kept


async def test_send_refuses_auth_and_redirects():
    async with client() as upstream:
        request = upstream.build_request("POST", "http://127.0.0.1:9/", content=b"")
        with pytest.raises(TypeError):
            await upstream.send(request, auth=("user", "pass"))
        with pytest.raises(TypeError):
            await upstream.send(request, follow_redirects=True)


async def test_header_injection_is_refused_before_sending():
    async with serving(reply(OK)) as server, client() as upstream:
        with pytest.raises(httpx.LocalProtocolError):
            await upstream.post(server.url, content=b"", headers={"x-bad": "a\r\nx-injected: 1"})
        assert server.received == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_https_with_the_callers_ssl_context(tmp_path):
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificate, key)
    client_context = ssl.create_default_context(cafile=str(certificate))
    server = Server(reply(OK))
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_ssl_over_tcp, server.handle, 0, server_context, host="127.0.0.1")
        )
        port = listener.transport_listener.socket.getsockname()[1]
        transport = LeanTransport(max_connections=2, ssl_context=client_context)
        async with UpstreamClient(transport=transport, timeout=httpx.Timeout(None, connect=5.0)) as upstream:
            for _ in range(2):
                assert (await upstream.post(f"https://127.0.0.1:{port}/v1", content=b"{}")).json() == {"ok": True}
        with pytest.raises(httpx.ConnectError):  # a certificate nobody vouches for
            async with UpstreamClient(transport=LeanTransport(max_connections=1)) as stranger:
                await stranger.post(f"https://127.0.0.1:{port}/v1", content=b"{}")
        nursery.cancel_scope.cancel()
    assert server.connections == 2  # reused over TLS; the stranger's handshake failed


async def test_the_pool_shares_connections_out_and_closes_its_own_transports():
    async with serving(reply(OK)) as server:
        pool = ClientPool(shards=3, max_connections=7, connect_timeout=5.0)
        clients = [pool.next() for _ in range(4)]
        assert clients[0] is clients[3] and len({id(each) for each in clients[:3]}) == 3
        for each in clients[:3]:
            assert (await each.post(server.url, content=b"")).status_code == 200
        await pool.aclose()
        assert all(each.is_closed for each in clients)

