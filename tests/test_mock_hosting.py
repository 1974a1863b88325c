"""orchestrator.hosting, over real sockets on 127.0.0.1 (port 0)."""

from __future__ import annotations

import email.utils
import errno
import gc
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httptools
import httpx
import pytest
import trio
import trio.testing
from quart_trio import QuartTrio

from mock_server import create_app
from orchestrator.asgi import until_disconnect
from orchestrator.http1 import Http1Protocol
from orchestrator.hosting import (
    ACCEPT_BATCH,
    DISCONNECT_EXTENSION,
    YOUNG_COLLECTION_THRESHOLD,
    ShieldedHTTPConnection,
    _Connection,
    accept_connections,
    serve,
)


def gated_app() -> tuple[QuartTrio, trio.Event, trio.Event]:
    """An app whose ``/slow`` answers only once ``release`` is set."""
    app = QuartTrio(__name__)
    app.asgi_http_class = ShieldedHTTPConnection
    entered, release = trio.Event(), trio.Event()

    @app.get("/slow")
    async def slow() -> str:
        entered.set()
        await release.wait()
        return "done"

    return app, entered, release


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


async def test_port_zero_reports_the_bound_url(nursery):
    urls = await nursery.start(partial(serve, create_app(), host="127.0.0.1", port=0))
    [url] = urls
    host, port = address(url)
    assert host == "127.0.0.1"
    assert port > 0
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/health")).json() == {"status": "healthy"}


async def test_responses_carry_a_current_date_and_do_not_name_the_server(nursery):
    [url] = await nursery.start(partial(serve, create_app()))
    async with httpx.AsyncClient() as client:
        first = await client.get(f"{url}/health")
        second = await client.get(f"{url}/health")
    for response in (first, second):
        sent = email.utils.parsedate_to_datetime(response.headers["date"])
        assert abs(sent.timestamp() - time.time()) < 5
        assert "server" not in response.headers


async def test_idle_keep_alive_connections_are_closed(nursery):
    [url] = await nursery.start(partial(serve, create_app(), keep_alive_timeout=0.2))
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: mock\r\n\r\n")
    answered = trio.current_time()
    with trio.fail_after(5):
        received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(b'{"status":"healthy"}')
    # Kept alive for the timeout, then closed by the server.
    assert trio.current_time() - answered >= 0.15
    await stream.aclose()


async def test_the_keep_alive_timeout_never_cuts_a_request_in_progress(nursery):
    app, entered, release = gated_app()
    [url] = await nursery.start(partial(serve, app, keep_alive_timeout=0.2))
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await entered.wait()
    await trio.sleep(0.5)  # busy for longer than the keep-alive timeout
    release.set()
    with trio.fail_after(5):
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"done")
    # Idle again: the same connection takes the next request within the timeout.
    await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    await stream.aclose()


async def test_an_early_413_closes_the_connection(nursery):
    app = create_app()
    app.config["MAX_CONTENT_LENGTH"] = 1024
    [url] = await nursery.start(partial(serve, app))
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nContent-Length: 100000\r\n\r\n"
        b'{"model":'
    )
    with trio.fail_after(5):
        received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 413")
    await stream.aclose()


async def test_shutdown_is_prompt_with_idle_kept_alive_clients():
    shutdown = trio.Event()
    async with httpx.AsyncClient() as client:
        async with trio.open_nursery() as nursery:
            [url] = await nursery.start(
                partial(
                    serve,
                    create_app(),
                    graceful_timeout=10,
                    keep_alive_timeout=60,
                    shutdown_trigger=shutdown.wait,
                )
            )
            # The client now holds an idle kept-alive connection.
            assert (await client.get(f"{url}/health")).status_code == 200
            shutdown.set()
            started = trio.current_time()
        assert trio.current_time() - started < 2  # not the 10 s grace period


async def test_shutdown_refuses_new_connections_and_finishes_in_flight_requests():
    app, entered, release = gated_app()
    shutdown = trio.Event()
    answers = []

    async def in_flight(url: str) -> None:
        async with httpx.AsyncClient() as client:
            answers.append(await client.get(f"{url}/slow"))

    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(
            partial(serve, app, graceful_timeout=10, shutdown_trigger=shutdown.wait)
        )
        nursery.start_soon(in_flight, url)
        await entered.wait()
        shutdown.set()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError):
            await trio.open_tcp_stream(*address(url))
        release.set()
    assert [(answer.status_code, answer.text) for answer in answers] == [(200, "done")]


async def test_the_grace_period_ends_in_flight_requests():
    app, entered, _ = gated_app()
    shutdown = trio.Event()

    async def in_flight(url: str) -> None:
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"{url}/slow")

    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(
            partial(serve, app, graceful_timeout=0.2, shutdown_trigger=shutdown.wait)
        )
        nursery.start_soon(in_flight, url)
        await entered.wait()
        started = trio.current_time()
        shutdown.set()
    assert 0.15 <= trio.current_time() - started < 2


def test_a_serving_process_freezes_what_it_imported_and_collects_young_objects_less_often():
    # In a process of its own: it changes the collector for everything in the process.
    script = (
        "import gc; from orchestrator import hosting; hosting.tune_collector_for_serving();"
        " print(gc.get_freeze_count(), *gc.get_threshold())"
    )
    frozen, young, middle, oldest = map(int, subprocess.check_output([sys.executable, "-c", script]).split())
    assert frozen > 10_000  # the imported modules, classes and functions
    assert (young, middle, oldest) == (YOUNG_COLLECTION_THRESHOLD, 10, 10)


def pieces_app(*bodies: bytes, length: bool = False):
    """A plain ASGI app answering every request with ``bodies``, one send each."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = [(b"content-length", str(sum(map(len, bodies))).encode())] if length else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, body in enumerate(bodies):
            await send({"type": "http.response.body", "body": body, "more_body": index < len(bodies) - 1})

    return app


@pytest.fixture
def socket_writes(monkeypatch) -> list[bytes]:
    """What the server's connections write to their sockets, write by write."""
    writes: list[bytes] = []
    original = _Connection._write

    async def recording(self: _Connection, data: bytes) -> None:
        writes.append(data)
        await original(self, data)

    monkeypatch.setattr(_Connection, "_write", recording)
    return writes


@pytest.mark.parametrize(
    ("bodies", "length", "expected"),
    [
        pytest.param((b'{"a":1}',), True, [b'{"a":1}'], id="a small answer: head and body in one write"),
        pytest.param((b"one", b"two", b"three"), True, [b"one", b"two", b"three"],
                     id="a body in pieces: the first with the head, the last on its own"),
        pytest.param((b"one", b"HTTP/1.1 200 OK", b"three"), True, [b"one", b"HTTP/1.1 200 OK", b"three"],
                     id="a body piece that looks like a head is not held"),
        pytest.param((b"data: 1\n\n", b"data: 2\n\n"), False,
                     [b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n0\r\n\r\n"],
                     id="a chunked stream: the last piece with its terminator"),
        pytest.param((b"data: 1\n\n", b""), False, [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"],
                     id="a stream ended by an empty send: the terminator alone"),
    ],
)
async def test_a_response_leaves_in_as_few_writes_as_its_sends_allow(nursery, socket_writes, bodies, length, expected):
    [url] = await nursery.start(partial(serve, pieces_app(*bodies, length=length)))
    async with httpx.AsyncClient() as client:
        for _ in range(2):  # and again on the kept-alive connection
            socket_writes.clear()
            response = await client.get(url)
            assert response.content == b"".join(bodies)
            head, *rest = socket_writes
            assert head.startswith(b"HTTP/1.1 200 ")
            assert [head.split(b"\r\n\r\n", 1)[1], *rest] == expected


async def test_a_long_answer_to_a_slow_reader_arrives_whole_and_in_order(nursery):
    # Far more than the socket buffers take: writes wait for the reader, and the ones
    # after them must queue behind, not jump ahead through the direct path.
    pieces = [bytes([65 + index % 26]) * 256 * 1024 for index in range(32)]
    [url] = await nursery.start(partial(serve, pieces_app(*pieces, length=True)))
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    await trio.sleep(0.2)  # let the server fill the socket buffers before we read
    with trio.fail_after(10):
        data = await read_until_closed(stream)
    assert data.split(b"\r\n\r\n", 1)[1] == b"".join(pieces)


def endless_app(sending: trio.Event, left: trio.Event):
    """A plain ASGI app streaming 64 KiB pieces until its client leaves (``left``)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await pieces_app()(scope, receive, send)
            return
        with trio.CancelScope() as cancel_scope:
            scope["extensions"][DISCONNECT_EXTENSION](cancel_scope)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            sending.set()
            while True:
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        left.set()

    return app


async def not_reading_client(url: str) -> trio.SocketStream:
    """A connection that asks for an answer and will not read it."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(address(url))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    return stream


async def test_a_client_that_reads_nothing_of_its_answer_is_reset_after_the_send_timeout(nursery):
    # hypercorn's write waited, shielded, for as long as the client did not read: the
    # request, and at the gateway its slot, were held for ever.
    sending, left = trio.Event(), trio.Event()
    [url] = await nursery.start(partial(serve, endless_app(sending, left), send_timeout=0.3))
    stream = await not_reading_client(url)
    with trio.fail_after(5):
        await sending.wait()
        started = trio.current_time()
        await left.wait()  # the app is told its client left
    assert 0.3 <= trio.current_time() - started < 2
    with pytest.raises(trio.BrokenResourceError):  # reset: what was sent is not read
        while await stream.receive_some(1 << 20):
            pass


async def shutdown_time(before_shutdown: Callable[[trio.SocketStream, trio.Event], Awaitable[None]],
                        **serve_options: Any) -> float:
    """How long a server of :func:`endless_app` takes to shut down, its client reading
    nothing of the answer, once ``before_shutdown(stream, left)`` has returned (``left``:
    the app was told its client left)."""
    sending, left = trio.Event(), trio.Event()
    shutdown = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            [url] = await nursery.start(partial(serve, endless_app(sending, left), shutdown_trigger=shutdown.wait,
                                                **serve_options))
            stream = await not_reading_client(url)
            await sending.wait()
            await before_shutdown(stream, left)
            shutdown.set()
            started = trio.current_time()
    elapsed = trio.current_time() - started
    await stream.aclose()
    return elapsed


@pytest.mark.parametrize("leaving", ["reads-nothing", "resets"])
async def test_a_connection_whose_writes_find_the_client_gone_ends_with_a_request_pipelined_behind(leaving):
    # The write that finds the client gone tells the protocol before it cancels the
    # request that is writing: cancelled first, the protocol's clean-up stopped halfway
    # and the pipelined request's wait for the cycle's end was never woken (the
    # connection stayed, and a shutdown waited its whole grace period for it).
    async def client_leaves(stream: trio.SocketStream, left: trio.Event) -> None:
        await stream.send_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")  # pipelined
        if leaving == "resets":
            await stream.receive_some(65536)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
        await left.wait()

    assert await shutdown_time(client_leaves, send_timeout=0.3, graceful_timeout=10) < 2  # not the grace period


async def test_a_write_waiting_for_a_client_that_reads_nothing_ends_with_the_grace_period():
    # A second signal (or the grace period's end) stopped nothing while a write waited.
    async def nothing(stream: trio.SocketStream, left: trio.Event) -> None:
        pass

    assert await shutdown_time(nothing, send_timeout=60, graceful_timeout=0.2) < 2  # not the send timeout


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_client_leaving_mid_request_cancels_it_at_once(nursery, reset):
    entered, cancelled = trio.Event(), trio.Event()

    async def waits_forever(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await pieces_app()(scope, receive, send)
            return
        with trio.CancelScope() as cancel_scope:
            scope["extensions"][DISCONNECT_EXTENSION](cancel_scope)
            entered.set()
            await trio.sleep_forever()
        cancelled.set()

    [url] = await nursery.start(partial(serve, waits_forever))
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(5):
        await entered.wait()
        if reset:  # SO_LINGER 0: close() sends RST, the server reads ECONNRESET
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        await cancelled.wait()


@pytest.fixture
def collector_off():
    """The cyclic garbage collector off for the test: what only it would free stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def connection_objects_left() -> int:
    """The server's per-connection objects still in memory, once the connections that
    have closed had the time to end (polled: the server ends them on its own time)."""
    for _ in range(20):
        await trio.sleep(0.05)
        left = sum(isinstance(thing, _Connection | Http1Protocol) for thing in gc.get_objects())
        if not left:
            break
    return left


@pytest.mark.parametrize("ending", ["client-closes", "connection-close", "idle-timeout", "client-resets"])
async def test_a_closed_connection_is_freed_without_the_cyclic_collector(nursery, collector_off, ending):
    # A server that serves until it exits collects young objects rarely (see
    # tune_collector_for_serving): a connection left in reference cycles would stay in
    # memory, socket object and all, until a collection, for every client that comes
    # and goes meanwhile.
    entered = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/forever":
            with trio.CancelScope() as cancel_scope:
                scope["extensions"][DISCONNECT_EXTENSION](cancel_scope)
                entered.set()
                await trio.sleep_forever()
            return
        await pieces_app(b"ok", length=True)(scope, receive, send)

    [url] = await nursery.start(partial(serve, app, keep_alive_timeout=0.05))
    stream = await trio.open_tcp_stream(*address(url))
    with trio.fail_after(5):
        if ending == "client-resets":
            await stream.send_all(b"GET /forever HTTP/1.1\r\nhost: x\r\n\r\n")
            await entered.wait()
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            close = b"connection: close\r\n" if ending == "connection-close" else b""
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n" + close + b"\r\n")
            assert (await stream.receive_some(65536)).endswith(b"\r\n\r\nok")
            if ending != "client-closes":
                assert await read_until_closed(stream) == b""  # the server closed it
        await stream.aclose()
    assert await connection_objects_left() == 0


def parsers_alive() -> int:
    return sum(isinstance(thing, httptools.HttpRequestParser) for thing in gc.get_objects())


async def test_a_connection_holds_a_parser_only_while_a_request_is_arriving(nursery, collector_off):
    # What 500 requests in flight cost in memory is mostly what each waits with: a
    # parser on a connection that has nothing more to parse is about 0.9 KiB of it.
    entered = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/wait":
            entered.set()
            await trio.sleep_forever()
        if scope["type"] == "http":  # the whole body first
            while (await receive()).get("more_body"):
                pass
        await pieces_app(b"ok", length=True)(scope, receive, send)

    [url] = await nursery.start(partial(serve, app))
    before = parsers_alive()
    waiting, arriving = await trio.open_tcp_stream(*address(url)), await trio.open_tcp_stream(*address(url))
    with trio.fail_after(5):
        await waiting.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await waiting.receive_some(65536)).endswith(b"\r\n\r\nok")
        assert parsers_alive() == before  # idle between requests
        await waiting.send_all(b"GET /wait HTTP/1.1\r\nhost: x\r\n\r\n")
        await entered.wait()
        assert parsers_alive() == before  # its request in flight, arrived whole
        await arriving.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
        await trio.sleep(0.1)
        assert parsers_alive() == before + 1  # half a body in: the parser holds its place
        await arriving.send_all(b"cd")
        assert (await arriving.receive_some(65536)).endswith(b"\r\n\r\nok")
        assert parsers_alive() == before


async def test_a_head_request_is_answered_whole_in_one_write(nursery, socket_writes):
    [url] = await nursery.start(partial(serve, pieces_app(b"body", length=True)))
    async with httpx.AsyncClient() as client:
        response = await client.head(url)
        assert (response.status_code, response.content) == (200, b"")
        assert len(socket_writes) == 1
        assert (await client.get(url)).content == b"body"


async def test_what_a_failed_last_send_leaves_is_written_at_once(nursery):
    # A body shorter than its Content-Length: h11 refuses the end of the body. What
    # the app did send must reach the client while the app is still running.
    failed, received = trio.Event(), trio.Event()

    async def short_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await pieces_app()(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        with pytest.raises(Exception, match="Too little data"):
            await send({"type": "http.response.body", "body": b"abc"})
        failed.set()
        await received.wait()

    [url] = await nursery.start(partial(serve, short_body))
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        while not data.endswith(b"abc"):
            data += await stream.receive_some(65536)
    received.set()  # the app waits for this, so what arrived was written while it ran
    with trio.fail_after(5):
        await failed.wait()
    assert data.startswith(b"HTTP/1.1 200 ")
    await stream.aclose()


async def test_http2_responses_are_not_held(nursery):
    # Over HTTP/2 (here cleartext, with prior knowledge) a client with a 10-byte flow
    # control window must get a 100-byte body frame by frame: a frame held back for a
    # write that only its delivery would allow never comes.
    [url] = await nursery.start(partial(serve, pieces_app(b"x" * 100)))
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10}
    )
    connection.initiate_connection()
    connection.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
                            end_stream=True)
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(connection.data_to_send())
    body, ended = b"", False
    with trio.fail_after(5):
        while not ended:
            for event in connection.receive_data(await stream.receive_some(65536)):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                ended = ended or isinstance(event, h2.events.StreamEnded)
            await stream.send_all(connection.data_to_send())
    assert body == b"x" * 100
    await stream.aclose()


async def test_an_http2_request_that_ends_alone_or_with_its_connection_is_cancelled(nursery):
    # One disconnect scope per connection, replaced by each request, left every
    # HTTP/2 request but the last running when its client went (RST_STREAM, or the
    # whole connection) until it ended by itself.
    started, cancelled = [], []

    async def answer(cancel_scope: trio.CancelScope, number: int) -> None:
        with cancel_scope:
            started.append(number)
            await trio.sleep_forever()
        cancelled.append(number)

    async def waits_forever(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await pieces_app()(scope, receive, send)
            return
        number = int(scope["path"].strip("/"))
        await until_disconnect(scope, receive, partial(answer, number=number))

    [url] = await nursery.start(partial(serve, waits_forever))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, [(":method", "GET"), (":path", f"/{stream_id}"), (":scheme", "http"),
                                        (":authority", "x")], end_stream=True)
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(client.data_to_send())
    with trio.fail_after(5):
        while len(started) < 3:
            await trio.sleep(0.01)
        client.reset_stream(3)
        await stream.send_all(client.data_to_send())
        while not cancelled:
            await trio.sleep(0.01)
        assert cancelled == [3]
        await stream.aclose()
        while len(cancelled) < 3:
            await trio.sleep(0.01)


async def test_an_http2_request_cancelled_while_its_write_waits_leaves_the_connection_to_the_others(nursery):
    # HTTP/2 writes every request's frames to one socket: a write cut halfway would
    # corrupt the framing for all, so the connection was reset. A request cancelled
    # while its own write waits (its response's head behind another's data) lets the
    # write end instead, and the other requests go on.
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await pieces_app()(scope, receive, send)
            return

        async def answer(cancel_scope: trio.CancelScope) -> None:
            with cancel_scope:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                while scope["path"] == "/endless":
                    await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                await trio.sleep_forever()

        await until_disconnect(scope, receive, answer)

    [url] = await nursery.start(partial(serve, app, send_timeout=10))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    client.initiate_connection()
    client.increment_flow_control_window(2**30)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(address(url))
    stream = trio.SocketStream(sock)
    request = [(":method", "GET"), (":scheme", "http"), (":authority", "x")]
    client.send_headers(1, [*request, (":path", "/endless")], end_stream=True)
    await stream.send_all(client.data_to_send())
    await trio.sleep(0.3)  # the endless stream fills the socket: nothing more goes
    client.send_headers(3, [*request, (":path", "/head-only")], end_stream=True)
    await stream.send_all(client.data_to_send())
    await trio.sleep(0.1)  # stream 3's head waits to be written behind stream 1's data
    client.reset_stream(3)
    await stream.send_all(client.data_to_send())
    await trio.sleep(0.1)  # stream 3 is cancelled as its write waits
    client.send_headers(5, [*request, (":path", "/head-only")], end_stream=True)
    await stream.send_all(client.data_to_send())
    data_after, answered = 0, None
    with trio.fail_after(5):
        # The connection was not reset, and stream 3's head was not dropped either (the
        # next head would not decode: they share HPACK's table): stream 1 goes on, and
        # stream 5 is answered.
        while data_after < 4 * 65536 or answered is None:
            for event in client.receive_data(await stream.receive_some(65536)):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                    data_after += len(event.data)
                    client.acknowledge_received_data(event.flow_controlled_length, 1)
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 5:
                    answered = dict(event.headers)[b":status"]
            await stream.send_all(client.data_to_send())
    assert answered == b"200"
    await stream.aclose()


async def _answer_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _received_now(stream: trio.SocketStream) -> bytes | None:
    try:
        return stream.socket._sock.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


async def _settle() -> None:
    for _ in range(5):
        await trio.testing.wait_all_tasks_blocked()


GET = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]


@pytest.mark.parametrize("version", ["1.1", "2"])
async def test_a_request_arriving_as_the_keep_alive_deadline_passes_is_answered(mock_clock, version):
    """The client's next request and the idle deadline in the same scheduler pass: the
    read wakes for the bytes first, and the deadline's cancel must not then reach the
    request it has read (it did when the deadline sat on the read loop's own scope:
    HTTP/1.1 closed unanswered, HTTP/2 hung)."""
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(partial(serve, _answer_ok, keep_alive_timeout=5))
        stream = await trio.open_tcp_stream(*address(url))
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        if version == "2":  # prior knowledge; one request answered first
            client.initiate_connection()
            client.send_headers(1, GET, end_stream=True)
            await stream.send_all(client.data_to_send())
            await _settle()
            client.receive_data(_received_now(stream))
            await stream.send_all(client.data_to_send())
            client.send_headers(3, GET, end_stream=True)
        else:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await _settle()
            assert _received_now(stream).endswith(b"ok")
        await _settle()  # idle: the read loop waits, its deadline 5 s away
        request = client.data_to_send() if version == "2" else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        stream.socket._sock.send(request)  # in the kernel before anything else runs
        mock_clock.jump(5)
        await _settle()
        answer = _received_now(stream)
        nursery.cancel_scope.cancel()
    assert answer
    if version == "2":
        assert any(isinstance(event, h2.events.StreamEnded) and event.stream_id == 3
                   for event in client.receive_data(answer))
    else:
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")



async def test_an_idle_connection_closes_at_its_deadline_counted_from_its_last_answer(mock_clock):
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(partial(serve, _answer_ok, keep_alive_timeout=5))
        stream = await trio.open_tcp_stream(*address(url))
        for _ in range(2):  # idle since it opened, then since its answer: short of 5 s
            mock_clock.jump(4.9)
            await _settle()
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await _settle()
            assert _received_now(stream).endswith(b"ok")
        mock_clock.jump(4.9)
        await _settle()
        assert _received_now(stream) is None  # still open
        mock_clock.jump(0.2)
        await _settle()
        assert _received_now(stream) == b""  # closed by the server
        nursery.cancel_scope.cancel()


async def test_a_connection_that_ends_is_not_kept_until_its_keep_alive_deadline(nursery, collector_off):
    [url] = await nursery.start(partial(serve, _answer_ok, keep_alive_timeout=60))
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        assert (await stream.receive_some(65536)).endswith(b"ok")
    await stream.aclose()
    assert await connection_objects_left() == 0


def listening_socket(backlog: int = 256) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def parked(served: list[trio.SocketStream], stream: trio.SocketStream) -> None:
    served.append(stream)
    await trio.sleep_forever()


async def tasks_after_each_accepting_step(clients: int, backlog: int = 256) -> list[int]:
    """Connect ``clients`` at once, then accept them: after each step of the accept loop
    that started handlers, how many tasks it had started in all (its own included).
    Counted per step, not from the handlers: trio runs a pass's tasks in either order."""
    with listening_socket(backlog) as listener:
        connected = [socket.create_connection(listener.getsockname()) for _ in range(clients)]
        counts: list[int] = []
        async with trio.open_nursery() as nursery:

            class AcceptingSteps(trio.abc.Instrument):
                def after_task_step(self, task: trio.lowlevel.Task) -> None:
                    started = len(nursery.child_tasks)
                    if task.name.endswith("accept_connections") and started > (counts or [1])[-1]:
                        counts.append(started)

            steps = AcceptingSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                nursery.start_soon(accept_connections, listener, partial(parked, []), nursery)
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            nursery.cancel_scope.cancel()
        for client in connected:
            client.close()
    return counts


async def test_every_connection_waiting_is_accepted_in_one_pass():
    # Clients whose handshakes the kernel has completed all have their handler's task
    # after one step of the loop: a busy server does not make a burst wait a pass each.
    assert await tasks_after_each_accepting_step(40) == [41]  # the loop and every connection's task


async def test_a_burst_larger_than_a_batch_is_accepted_in_batches():
    # One batch, then the loop let the handlers run (a checkpoint) before it took the rest.
    counts = await tasks_after_each_accepting_step(ACCEPT_BATCH + 10, backlog=2 * ACCEPT_BATCH)
    assert counts == [ACCEPT_BATCH + 1, ACCEPT_BATCH + 11]


async def test_accepting_keeps_going_through_errors_trio_would_survive(autojump_clock, caplog):
    # EMFILE is logged and retried after a pause (the connection stays in the backlog);
    # a connection aborted before it was accepted is skipped; a closed socket ends the loop.
    errors = [OSError(errno.EMFILE, "Too many open files"), OSError(errno.ECONNABORTED, "aborted")]

    class Flaky:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def fileno(self) -> int:
            return self.sock.fileno()

        def accept(self) -> tuple[socket.socket, Any]:
            if errors:
                raise errors.pop(0)
            return self.sock.accept()

    with listening_socket() as listener, socket.create_connection(listener.getsockname()):
        served: list[trio.SocketStream] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_connections, Flaky(listener), partial(parked, served), nursery)
            with trio.fail_after(1):
                while not served:
                    await trio.sleep(0.01)
            assert not errors
            assert "Too many open files" in caplog.text
            trio.lowlevel.notify_closing(listener)  # the loop, waiting for more, ends
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()


async def test_a_listening_socket_closed_ends_accepting():
    class Closed:
        def fileno(self) -> int:
            return -1

        def accept(self) -> tuple[socket.socket, Any]:
            raise OSError(errno.EBADF, "Bad file descriptor")

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await accept_connections(Closed(), partial(parked, []), nursery)
