"""orchestrator.http1 (HTTP/1.1 through llhttp), byte for byte over real sockets on 127.0.0.1."""

from __future__ import annotations

import gc
import json
from functools import partial
from typing import Any

import h2.config
import h2.connection
import pytest
import trio
from hypercorn.config import Config

from orchestrator.hosting import serve
from orchestrator.http1 import Http1Protocol
from scheduling import counting_suspensions


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class EchoApp:
    """Answers ``METHOD path body`` to every request. ``headers`` and ``status`` shape the
    answer; ``pieces`` sends the body in that many sends; ``log`` records each request's
    start and end, so a test can see whether two requests overlapped."""

    def __init__(self, *, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
                 length: bool = True, pieces: int = 1, read: bool = True) -> None:
        self.status = status
        self.read = read
        self.headers = headers or []
        self.length = length
        self.pieces = pieces
        self.log: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.log.append(f"start {scope['path']}")
        body = b""
        while self.read:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await trio.sleep(0.01)  # long enough for a pipelined request to overlap, if it could
        answer = b"%s %s %s" % (scope["method"].encode(), scope["path"].encode(), body)
        headers = list(self.headers)
        if self.length:
            headers.append((b"content-length", b"%d" % len(answer)))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        size = -(-len(answer) // self.pieces)
        for index in range(self.pieces):
            piece = answer[index * size:(index + 1) * size]
            last = index == self.pieces - 1
            if last:  # before the send that ends the response, and so lets the next one in
                self.log.append(f"end {scope['path']}")
            await send({"type": "http.response.body", "body": piece, "more_body": not last})


async def exchange(url: str, data: bytes | list[bytes], *, until: bytes | None = None) -> bytes:
    """Send ``data`` (pieces with a pause between them) and read until ``until`` has
    arrived, or until the server closes the connection."""
    stream = await trio.open_tcp_stream(*address(url))
    received = b""
    with trio.fail_after(5):
        for piece in [data] if isinstance(data, bytes) else data:
            try:
                await stream.send_all(piece)
            except trio.BrokenResourceError:
                break  # the server has closed the connection: read what it said
            await trio.sleep(0.01)
        while until is None or until not in received:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            received += chunk
    await stream.aclose()
    return received


def split_responses(data: bytes) -> list[tuple[bytes, dict[bytes, list[bytes]], bytes]]:
    """Status lines, headers and bodies of ``Content-Length`` responses, in order."""
    responses = []
    while data:
        head, data = data.split(b"\r\n\r\n", 1)
        status, *lines = head.split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, value = line.split(b": ", 1)
            headers.setdefault(name.lower(), []).append(value)
        length = int(headers.get(b"content-length", [b"0"])[0])
        responses.append((status, headers, data[:length]))
        data = data[length:]
    return responses


@pytest.fixture
async def echo(nursery):
    """Serves an :class:`EchoApp`: yields a function that starts one and returns its URL."""

    async def start(**options: Any) -> tuple[str, EchoApp]:
        app = EchoApp(**options)
        [url] = await nursery.start(partial(serve, app))
        return url, app

    return start


async def test_a_sized_answer_carries_its_length_once_and_a_reason_phrase(echo):
    url, _ = await echo()
    data = await exchange(url, b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    [(status, headers, body)] = split_responses(data)
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == [b"7"] and headers[b"connection"] == [b"close"]
    assert b"date" in headers and b"transfer-encoding" not in headers
    assert body == b"GET /a "


async def test_an_answer_without_a_length_is_chunked_for_http_1_1(echo):
    url, _ = await echo(length=False, pieces=2)
    data = await exchange(url, b"POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi", until=b"0\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head
    assert body == b"5\r\nPOST \r\n5\r\n/c hi\r\n0\r\n\r\n"


async def test_an_http_1_0_client_gets_a_body_that_ends_with_the_connection(echo):
    url, _ = await echo(length=False)
    data = await exchange(url, b"GET /old HTTP/1.0\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head
    assert b"transfer-encoding" not in head
    assert body == b"GET /old "


async def test_an_http_1_0_client_is_not_kept_alive_even_if_it_asks(echo):
    url, _ = await echo()
    data = await exchange(url, b"GET /old HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")  # ends: the server closed
    assert b"connection: close" in data and data.endswith(b"GET /old ")


@pytest.mark.parametrize(
    ("request_line", "status"),
    [(b"HEAD /h HTTP/1.1", 200), (b"GET /n HTTP/1.1", 204), (b"GET /n HTTP/1.1", 304)],
)
async def test_no_body_for_head_204_and_304(echo, request_line, status):
    url, _ = await echo(status=status, length=False)
    data = await exchange(url, request_line + b"\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"transfer-encoding" not in head
    assert body == b""


async def test_a_body_that_arrived_whole_reaches_the_app_in_one_message(nursery):
    received: list[dict[str, Any]] = []

    async def recorder(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await EchoApp()(scope, receive, send)
            return
        while not received or received[-1].get("more_body"):
            received.append(await receive())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    [url] = await nursery.start(partial(serve, recorder))
    await exchange(url, b"POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello")
    assert received == [{"type": "http.request", "body": b"hello", "more_body": False}]


async def test_requests_on_a_kept_alive_connection_and_a_chunked_request_body(echo):
    url, _ = await echo()
    data = await exchange(
        url,
        [
            b"POST /1 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\none",
            b"POST /2 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntwo\r\n",
            b"6\r\n three\r\n0\r\n\r\n",
            b"GET /3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        ],
    )
    bodies = [body for _, _, body in split_responses(data)]
    assert bodies == [b"POST /1 one", b"POST /2 two three", b"GET /3 "]


async def test_a_kept_alive_request_costs_its_connection_two_steps_and_its_app_one(nursery):
    # The read loop wakes with the request and hands it to a new app task, whose queue's
    # send lets the app answer before the loop goes on (step one); then it waits for the
    # next request (step two). No other hop: the previous response has ended, so starting
    # this one does not wait for it, and the app's answer ends within its own step.
    async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await EchoApp()(scope, receive, send)
            return
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    [url] = await nursery.start(partial(serve, answer))
    stream = await trio.open_tcp_stream(*address(url))
    requests = 5

    async def ask() -> None:
        await stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
        received = b""
        while not received.endswith(b"\r\n\r\nhi"):
            received += await stream.receive_some()

    with trio.fail_after(5):
        await ask()  # the connection is accepted and served once: what follows is steady
        with counting_suspensions() as suspensions:
            for _ in range(requests):
                await ask()
    await stream.aclose()
    assert suspensions.by_name["_serve_connection"] == 2 * requests
    assert suspensions.by_name["_handle"] == requests


async def test_a_connection_closes_after_keep_alive_max_requests(echo, monkeypatch):
    monkeypatch.setattr(Config, "keep_alive_max_requests", 2)
    url, app = await echo()
    data = await exchange(url, [b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % index for index in range(3)])
    responses = split_responses(data)  # returns once the server has closed
    assert [body for _, _, body in responses] == [b"GET /0 ", b"GET /1 "]
    assert b"connection" not in responses[0][1] and responses[1][1][b"connection"] == [b"close"]
    assert app.log == ["start /0", "end /0", "start /1", "end /1"]


async def test_an_app_that_says_connection_close_gets_it_once_and_the_connection_closes(echo):
    url, app = await echo(headers=[(b"Connection", b"close")])
    data = await exchange(url, [b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n", b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\n"])
    [(_, headers, body)] = split_responses(data)
    assert body == b"GET /1 " and headers[b"connection"] == [b"close"]
    assert app.log == ["start /1", "end /1"]


async def test_pipelined_requests_are_served_one_after_another_in_order(echo):
    url, app = await echo()
    data = await exchange(
        url,
        b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nb"
        b"GET /3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    assert [body for _, _, body in split_responses(data)] == [b"GET /1 ", b"POST /2 b", b"GET /3 "]
    assert app.log == ["start /1", "end /1", "start /2", "end /2", "start /3", "end /3"]


async def test_bytes_after_a_request_that_closes_the_connection_are_not_read(echo):
    url, app = await echo()
    data = await exchange(url, b"GET /1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\nGARBAGE")
    assert [body for _, _, body in split_responses(data)] == [b"GET /1 "]
    assert app.log == ["start /1", "end /1"]


async def test_an_answer_given_before_reading_a_request_that_arrived_whole_keeps_the_connection(echo):
    url, app = await echo(read=False)
    data = await exchange(
        url,
        b"POST /1 HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
        b"GET /2 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    assert [body for _, _, body in split_responses(data)] == [b"POST /1 ", b"GET /2 "]


async def test_an_app_that_stops_taking_a_long_body_gets_its_connection_closed(echo):
    # More pieces than hypercorn queues per request: the read loop would wait forever
    # to hand over the rest, so the connection cannot serve another request.
    url, app = await echo(read=False)
    chunks = b"".join(b"1\r\n%d\r\n" % (index % 10) for index in range(50))
    data = await exchange(
        url,
        b"POST /1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\n",
    )  # returns once the server has closed
    assert [body for _, _, body in split_responses(data)] == [b"POST /1 "]
    assert app.log == ["start /1", "end /1"]


async def test_expect_100_continue_is_answered_before_the_body_is_sent(echo):
    url, _ = await echo()
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(b"POST /e HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
    with trio.fail_after(5):
        assert await stream.receive_some(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"ok")
        data = b""
        while not data.endswith(b"POST /e ok"):
            data += await stream.receive_some(65536)
    await stream.aclose()


@pytest.mark.parametrize(
    ("raw_request", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n host: x\r\n\r\n", 400, id="malformed head"),
        pytest.param(b"GET /\xc3\xa9 HTTP/1.1\r\nhost: x\r\n\r\n", 400, id="non-ASCII target"),
        pytest.param(b"GET / HTTP/1.1\r\nhost: x\r\nx: a\x00b\r\n\r\n", 400, id="control character"),
        pytest.param(b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", 400,
                     id="length and chunked: a smuggling shape"),
        pytest.param(b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n", 400,
                     id="two lengths"),
        pytest.param(b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501,
                     id="a transfer coding other than chunked"),
        pytest.param(b"BREW / HTTP/1.1\r\nhost: x\r\n\r\n", 501, id="unknown method"),
        pytest.param(b"GET / HTTP/1.1\r\naccept: */*\r\n\r\n", 400, id="HTTP/1.1 without host"),
        pytest.param(b"GET / HTTP/2.0\r\nhost: x\r\n\r\n", 505, id="another version"),
        pytest.param(b"GET /\r\n\r\n", 505, id="no version (HTTP/0.9)"),
        pytest.param(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n", 431,
                     id="head over the limit"),
    ],
)
async def test_a_request_that_cannot_be_served_is_refused_and_the_connection_closed(echo, raw_request, status):
    url, app = await echo()
    data = await exchange(url, raw_request)  # returns once the server has closed
    [(status_line, headers, body)] = split_responses(data)
    assert status_line.startswith(b"HTTP/1.1 %d " % status)
    assert headers[b"connection"] == [b"close"]
    assert headers[b"content-type"] == [b"application/json"]
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert app.log == []


async def test_a_head_over_the_limit_is_refused_even_when_it_trickles_in(echo):
    url, app = await echo()
    pieces = [b"GET / HTTP/1.1\r\nhost: x\r\nx-big: "] + [b"a" * 1000] * 20
    data = await exchange(url, pieces)
    assert data.startswith(b"HTTP/1.1 431 ")
    assert app.log == []


async def test_a_head_under_the_limit_is_served_however_it_is_split(echo):
    url, _ = await echo()
    head = b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: " + b"a" * 12_000 + b"\r\n\r\n"
    data = await exchange(url, [head[:5000], head[5000:10000], head[10000:]])
    assert [body for _, _, body in split_responses(data)] == [b"GET /big "]


async def test_empty_lines_before_a_first_request_are_not_kept(echo):
    # They are no head, so no head's limit bounds them: kept for a protocol switch, a
    # client sending nothing else grew the connection by all it sent.
    url, _ = await echo()
    stream = await trio.open_tcp_stream(*address(url))
    with trio.fail_after(5):
        for _ in range(64):
            await stream.send_all(b"\r\n" * 32_768)
        await trio.sleep(0.05)  # the server reads what is in flight
        gc.collect()  # no protocol of an earlier test's is left to be found
        [protocol] = [item for item in gc.get_objects() if isinstance(item, Http1Protocol)]
        assert len(protocol._preamble) < 65_536  # 4 MiB were sent
        await stream.send_all(b"GET /after HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    assert [body for _, _, body in split_responses(received)] == [b"GET /after "]


async def test_a_bad_request_after_a_good_one_is_refused_after_the_good_one_is_answered(echo):
    url, app = await echo()
    data = await exchange(url, b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\n host: x\r\n\r\n")
    [first, second] = split_responses(data)
    assert first[2] == b"GET /1 " and second[0].startswith(b"HTTP/1.1 400 ")
    assert app.log == ["start /1", "end /1"]


@pytest.mark.parametrize(
    "header",
    [(b"x-split", b"a\r\nset-cookie: evil=1"), (b"bad name", b"v"), (b"x-nul", b"a\x00")],
)
async def test_a_response_header_that_would_corrupt_the_head_is_refused(echo, header):
    url, _ = await echo(headers=[header])
    data = await exchange(url, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500 ")
    assert b"evil" not in data


async def test_a_body_longer_than_its_content_length_is_cut_and_the_connection_closed(echo):
    url, _ = await echo(headers=[(b"content-length", b"2")], length=False)
    data = await exchange(url, b"GET /long HTTP/1.1\r\nhost: x\r\n\r\nGET /next HTTP/1.1\r\nhost: x\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""  # the oversized piece is not sent


async def test_an_h2c_upgrade_on_a_first_request_is_served_over_http2(echo):
    url, _ = await echo()
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = connection.initiate_upgrade_connection()
    data = await exchange(
        url,
        b"GET /up HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
        b"http2-settings: " + settings + b"\r\n\r\n",
        until=b"GET /up ",
    )
    assert data.startswith(b"HTTP/1.1 101 ")


async def test_an_upgrade_on_a_later_request_is_answered_as_a_plain_request(echo):
    url, app = await echo()
    data = await exchange(
        url,
        [
            b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET /2 HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
            b"GET /3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        ],
    )
    assert [body for _, _, body in split_responses(data)] == [b"GET /1 ", b"GET /2 ", b"GET /3 "]
