"""Overload, disconnects, hostile clients and shutdown, over real loopback sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import httpx
import orjson
import pytest
import trio

from gateway_fixtures import SEED_BODY, demo_config, start_gateway, wait_until_serving
from mock_server.faults import FaultProfile
from orchestrator.server import serve_gateway
from rawserver import serving

ORCHESTRATOR = str(Path(sys.executable).with_name("orchestrator"))


def with_provider_limits(config, **changes):
    return attrs.evolve(config, providers=tuple(attrs.evolve(p, **changes) for p in config.providers))


async def wait_for(predicate, *, within: float, step: float = 0.002) -> None:
    with trio.fail_after(within):
        while not predicate():
            await trio.sleep(step)


# -- overload -----------------------------------------------------------------------------


async def test_a_burst_of_five_times_capacity_is_shed_at_once_and_health_stays_prompt(
    mock_server_url, mock_state, nursery
):
    capacity = 4  # per provider; two providers
    config = with_provider_limits(demo_config(mock_server_url), max_concurrency=capacity)
    url = await start_gateway(nursery, config)
    # Long enough that the whole burst arrives while the first requests are still upstream.
    mock_state.configure(FaultProfile(latency_ms=1000), "all")
    statuses: list[int] = []
    health_times: list[float] = []
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as client:

        async def one() -> None:
            response = await client.post(f"{url}/v1/chat/completions", content=SEED_BODY)
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["code"] == "service_unavailable"

        async with trio.open_nursery() as burst:
            for _ in range(5 * 2 * capacity):
                burst.start_soon(one)
            await trio.sleep(0.1)
            for _ in range(3):
                start = trio.current_time()
                health = await client.get(f"{url}/health")
                health_times.append(trio.current_time() - start)
                assert health.status_code == 200
        assert statuses.count(200) == 2 * capacity
        assert statuses.count(503) == 5 * 2 * capacity - 2 * capacity
        assert max(health_times) < 0.25
        # And it recovers by itself.
        after = await client.post(f"{url}/v1/chat/completions", content=SEED_BODY)
        assert after.status_code == 200
        state = (await client.get(f"{url}/health")).json()
    assert all(p["in_flight"] == 0 for p in state["providers"].values())
    assert state["in_flight"] == 0


async def test_the_gateway_in_flight_limit(mock_server_url, mock_state, nursery):
    url = await start_gateway(nursery, demo_config(mock_server_url, max_in_flight=2))
    mock_state.configure(FaultProfile(latency_ms=300), "all")
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=10) as client:

        async def one() -> None:
            statuses.append((await client.post(f"{url}/v1/chat/completions", content=SEED_BODY)).status_code)

        async with trio.open_nursery() as burst:
            for _ in range(6):
                burst.start_soon(one)
    assert sorted(statuses) == [200, 200, 503, 503, 503, 503]


# -- disconnects close the upstream call ----------------------------------------------------


async def test_a_client_leaving_a_non_streaming_request_closes_the_upstream_within_50ms(
    mock_server_url, mock_state, nursery
):
    url = await start_gateway(nursery, demo_config(mock_server_url))
    mock_state.configure(FaultProfile(latency_ms=5000))
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.move_on_after(0.3):
            await client.post(f"{url}/v1/chat/completions", content=SEED_BODY)
    left = trio.current_time()
    await wait_for(lambda: mock_state["openai"].stats.disconnects == 1, within=0.05)
    assert trio.current_time() - left < 0.05


async def test_a_client_leaving_during_a_backoff_wait_ends_the_journey(mock_server_url, mock_state, nursery, caplog):
    url = await start_gateway(nursery, demo_config(mock_server_url, backoff=0.5))
    mock_state.configure(FaultProfile(server_error_probability=1.0))
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.move_on_after(0.2):  # the first attempt failed; the router is waiting 0.5 s
            await client.post(f"{url}/v1/chat/completions", content=SEED_BODY)
        await trio.sleep(1.0)
        health = (await client.get(f"{url}/health")).json()
    assert mock_state["openai"].stats.requests == 1  # no retry after the client left
    assert mock_state["anthropic"].stats.requests == 0
    assert health["in_flight"] == 0


# -- hostile and slow clients -----------------------------------------------------------------


async def open_raw(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


async def read_until_closed(stream: trio.SocketStream, *, within: float) -> bytes:
    received = b""
    with trio.fail_after(within):
        while True:
            try:
                piece = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return received
            if not piece:
                return received
            received += piece


async def test_a_chunked_body_over_the_limit_is_refused_before_it_is_read_whole(mock_server_url, nursery):
    config = demo_config(mock_server_url, max_body_bytes=64 * 1024)
    url = await start_gateway(nursery, config)
    stream = await open_raw(url)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
    sent = 0
    piece = b"x" * 16384
    with trio.move_on_after(2):
        while sent < 10 * 1024 * 1024:  # far more than the limit; the server must stop us early
            try:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
            except trio.BrokenResourceError:
                break
            sent += len(piece)
    answer = await read_until_closed(stream, within=3)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"request_too_large" in answer
    assert sent < 10 * 1024 * 1024


async def test_a_declared_body_over_the_limit_is_refused_before_a_byte_of_it_is_sent(mock_server_url, nursery):
    config = demo_config(mock_server_url, max_body_bytes=64 * 1024)
    url = await start_gateway(nursery, config)
    stream = await open_raw(url)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 65537\r\n\r\n")
    answer = await read_until_closed(stream, within=3)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"request_too_large" in answer


async def test_an_oversized_request_head_is_refused(mock_server_url, nursery):
    url = await start_gateway(nursery, demo_config(mock_server_url))
    stream = await open_raw(url)
    await stream.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\nx-junk: " + b"a" * 64 * 1024 + b"\r\n\r\n")
    answer = await read_until_closed(stream, within=3)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/health", "/nowhere"])
async def test_a_websocket_handshake_gets_a_400_in_openais_shape(mock_server_url, nursery, caplog, path):
    url = await start_gateway(nursery, demo_config(mock_server_url))
    stream = await open_raw(url)
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
        "x-request-id: ws-1\r\n\r\n".encode()
    )
    head, _, body = (await read_until_closed(stream, within=3)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"x-request-id: ws-1" in head
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "WebSocket" in error["message"]
    assert error["request_id"] == "ws-1"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_a_client_that_never_finishes_its_head_is_closed(mock_server_url, nursery):
    url = await start_gateway(nursery, demo_config(mock_server_url, keep_alive=0.3))
    stream = await open_raw(url)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and nothing more
    start = trio.current_time()
    await read_until_closed(stream, within=3)
    assert trio.current_time() - start < 1.5


async def endless_stream(stream: trio.SocketStream, request: bytes) -> None:
    """An OpenAI-format upstream whose stream never ends: 16 KiB of content a chunk."""
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"content": "x" * 16384}, "finish_reason": None}]}
    event = b"data: " + orjson.dumps(chunk) + b"\n\n"
    framed = b"%x\r\n%s\r\n" % (len(event), event)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while True:
            await stream.send_all(framed)


async def test_a_client_that_reads_nothing_of_its_stream_is_cut_off_and_gives_back_its_place(nursery):
    # The gateway's write used to wait for such a client for ever: its request counted
    # against max_in_flight, and a shutdown waited for it.
    async with serving(endless_stream) as upstream:
        url = await start_gateway(nursery, demo_config(upstream.url, send_timeout=0.3))
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        body = orjson.loads(SEED_BODY) | {"stream": True}
        await sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(orjson.dumps(body)), orjson.dumps(body)))
        started = trio.current_time()
        async with httpx.AsyncClient() as client:

            async def in_flight() -> int:
                return (await client.get(f"{url}/health")).json()["in_flight"]

            with trio.fail_after(5):
                while await in_flight() == 0:  # the stream is under way
                    await trio.sleep(0.01)
                while await in_flight() != 0:  # and then the client is given up
                    await trio.sleep(0.05)
        assert trio.current_time() - started >= 0.3  # the client took nothing for 0.3 s
        sock.close()


async def test_a_client_that_trickles_its_body_is_cut_off(mock_server_url, mock_state, nursery):
    url = await start_gateway(nursery, demo_config(mock_server_url, body_timeout=0.3))
    stream = await open_raw(url)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
    start = trio.current_time()
    answer = await read_until_closed(stream, within=3)
    assert trio.current_time() - start < 1.5
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in answer and b"x-request-id" in answer
    assert mock_state["openai"].stats.requests == 0


# -- shutdown -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_sigterm_refuses_new_connections_answers_in_flight_requests_and_exits_0(
    mock_server_url, mock_state, tmp_path
):
    port = free_port()
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        f"""
shutdown_grace_seconds = 10
[providers.openai]
kind = "openai"
base_url = "{mock_server_url}/v1"
[[routes]]
match = "gpt-*"
deployments = [{{ provider = "openai" }}]
"""
    )
    mock_state.configure(FaultProfile(latency_ms=1500))
    process = await trio.lowlevel.open_process(
        [ORCHESTRATOR, "serve", "--config", str(config_file), "--port", str(port), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_until_serving(client, url)
            statuses: list[int] = []

            async def one() -> None:
                statuses.append((await client.post(f"{url}/v1/chat/completions", content=SEED_BODY)).status_code)

            async with trio.open_nursery() as in_flight:
                for _ in range(5):
                    in_flight.start_soon(one)
                await wait_for(lambda: mock_state["openai"].stats.requests == 5, within=5)
                process.send_signal(signal.SIGTERM)
                await trio.sleep(0.2)
                with pytest.raises(httpx.ConnectError):
                    async with httpx.AsyncClient() as fresh:
                        await fresh.get(f"{url}/health")
            assert statuses == [200] * 5
        with trio.fail_after(10):
            code = await process.wait()
        assert code == 0, (await process.stderr.receive_some()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_with_mock_is_make_run_and_one_ctrl_c_stops_both():
    port, mock_port = free_port(), free_port()
    process = await trio.lowlevel.open_process(
        [ORCHESTRATOR, "serve", "--with-mock", "--port", str(port), "--mock-port", str(mock_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_until_serving(client, f"http://127.0.0.1:{port}")
            reset = await client.post(f"http://127.0.0.1:{mock_port}/config/failures", content=b"{}")
            assert reset.status_code == 200
            answer = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=SEED_BODY)
            assert answer.status_code == 200
            assert answer.headers["x-orchestrator-provider"] == "openai"
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_graceful_shutdown_does_not_wait_for_pipelined_keep_alive_connections(
    mock_server_url, mock_state, nursery
):
    # A client that sends its next request before the current one is answered (as wrk
    # does) used to leave hypercorn's read loop waiting forever once the server chose to
    # close instead of recycling: shutdown then took the whole grace period.
    mock_state.configure(FaultProfile(latency_ms=300))
    config = demo_config(mock_server_url, shutdown_grace=30)
    stopping = trio.Event()
    stopped = trio.Event()

    async def gateway(task_status=trio.TASK_STATUS_IGNORED):
        await serve_gateway(config, port=0, handle_signals=False, shutdown_trigger=stopping.wait,
                            task_status=task_status)
        stopped.set()

    [url] = await nursery.start(gateway)
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
               % (len(SEED_BODY), SEED_BODY))
    streams = [await open_raw(url) for _ in range(3)]
    for stream in streams:
        await stream.send_all(request + request)  # pipelined: the second waits for the first
    await trio.sleep(0.1)
    stopping.set()
    start = trio.current_time()
    answers = [await read_until_closed(stream, within=5) for stream in streams]
    with trio.fail_after(5):
        await stopped.wait()
    assert trio.current_time() - start < 2  # not the 30 s grace period
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
