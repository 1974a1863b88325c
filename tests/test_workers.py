"""``orchestrator serve --workers N``: N processes on one port, started and stopped as one.

Each test runs the real command as a subprocess against the mock served by the test
itself. Which worker serves a connection is read from the kernel: the server side of
the connection (``/proc/net/tcp``) is a socket inode, and exactly one worker holds it
among its file descriptors.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from orchestrator.cli import build_parser

BODY = b'{"model":"gpt-4","messages":[{"role":"user","content":"test"}]}'
SLOW_BODY = b'{"model":"slow","messages":[{"role":"user","content":"test"}]}'
#: Mock latency of model "slow": long enough to be in flight when the signal lands.
SLOW_MS = 600
SERVING = re.compile(rb"serving on http://127\.0\.0\.1:(\d+) with 2 workers \(pids (\d+), (\d+)\)")


class Gateway:
    """A running ``orchestrator serve --workers 2`` and its log, read as it is written."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = bytearray()
        self.port = 0
        self.workers: list[int] = []
        self._grew = trio.Event()
        self._closed = False

    async def drain(self) -> None:
        """Read the log to its end (stderr closes once the parent and workers are gone)."""
        async for chunk in self.process.stderr:
            self.log += chunk
            self._grew.set()
            self._grew = trio.Event()
        self._closed = True
        self._grew.set()

    async def wait_for(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        while not (found := pattern.search(self.log)):
            assert not self._closed, f"the gateway exited first: {self.log.decode()}"
            await self._grew.wait()
        return found


@asynccontextmanager
async def gateway(mock_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
shutdown_grace_seconds = 5
[providers.openai]
kind = "openai"
base_url = "{mock_url}/v1"
[providers.slow]
kind = "openai"
base_url = "{mock_url}/d{SLOW_MS}/v1"
[[routes]]
match = "gpt-*"
deployments = [{{ provider = "openai" }}]
[[routes]]
match = "slow"
deployments = [{{ provider = "slow" }}]
"""
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "orchestrator", "serve", "--config", str(config), "--port", "0", "--workers", "2"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    running = Gateway(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.drain)
        try:
            with trio.fail_after(30):
                found = await running.wait_for(SERVING)
            running.port = int(found.group(1))
            running.workers = [int(found.group(2)), int(found.group(3))]
            yield running
        finally:
            # Never leave a process behind, even when the test failed.
            if process.returncode is None:
                process.kill()
            for pid in running.workers:
                _kill_quietly(pid)
    await process.wait()


async def http(stream: trio.SocketStream, request: bytes) -> tuple[int, bytes]:
    """One request on a kept-alive connection; the status and the body."""
    await stream.send_all(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, "connection closed before the response head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = await stream.receive_some()
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(head.split()[1]), body


def post(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def serving_pid(client_port: int, server_port: int, workers: list[int]) -> int:
    """The worker whose file descriptors hold the server side of this connection."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = fields[9]
    assert inode is not None, f"no server socket for client port {client_port}"
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except FileNotFoundError:
                continue
    raise AssertionError(f"no worker holds socket {inode}")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def test_both_workers_serve_and_sigterm_stops_them_gracefully(mock_state, mock_server_url, tmp_path):
    async with gateway(mock_server_url, tmp_path) as running:
        assert all(parent_of(pid) == running.process.pid for pid in running.workers)
        # The kernel spreads connections over the workers by address hash: with 24
        # connections, all on one worker has odds of 2 in 16 million.
        served_by = set()
        streams = []
        for _ in range(24):
            stream = await trio.open_tcp_stream("127.0.0.1", running.port)
            streams.append(stream)
            status, body = await http(stream, post(BODY))
            assert status == 200, body
            served_by.add(serving_pid(stream.socket.getsockname()[1], running.port, running.workers))
        assert served_by == set(running.workers)
        for stream in streams:
            await stream.aclose()

        # A request in flight when SIGTERM arrives is still answered; then all exit.
        slow = await trio.open_tcp_stream("127.0.0.1", running.port)
        answered: list[int] = []

        async def slow_request() -> None:
            status, _ = await http(slow, post(SLOW_BODY))
            answered.append(status)

        received = mock_state["openai"].stats.requests
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            with trio.fail_after(10):
                while mock_state["openai"].stats.requests == received:  # not yet at the mock
                    await trio.sleep(0.01)
            running.process.send_signal(signal.SIGTERM)
        assert answered == [200]
        with trio.fail_after(15):
            assert await running.process.wait() == 0
        assert all(gone(pid) for pid in running.workers)
        assert b"SIGTERM: stopping 2 workers gracefully" in running.log


async def test_a_worker_that_dies_stops_the_other_and_fails_the_parent(mock_server_url, tmp_path):
    async with gateway(mock_server_url, tmp_path) as running:
        victim, survivor = running.workers
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(15):
            status = await running.process.wait()
        assert status != 0
        assert gone(survivor)
        assert f"pid {victim}) died with signal SIGKILL".encode() in running.log


def test_a_busy_port_fails_before_any_worker_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = subprocess.run(
            [sys.executable, "-m", "orchestrator", "serve", "--port", str(port), "--workers", "2"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    assert finished.returncode == 1
    assert "cannot serve on 127.0.0.1" in finished.stderr


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_must_be_a_positive_number(workers, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("serve").parse_args(["serve", "--workers", workers])
    assert exit_info.value.code == 2
