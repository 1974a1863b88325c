"""``python -m mock_server`` as a process: it serves, and signals stop it promptly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import pytest
import trio

from mock_server.testing import PATHS, body_for


@attrs.define
class Running:
    process: trio.Process
    url: str
    log: bytearray

    async def wait(self) -> int:
        """Wait for the process to exit, collecting the rest of its log."""
        async for chunk in self.process.stderr:
            self.log += chunk
        return await self.process.wait()


@asynccontextmanager
async def mock_provider(*arguments: str) -> AsyncIterator[Running]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mock_server", "--port", "0", *arguments],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        log = bytearray()
        with trio.fail_after(20):
            while not (found := re.search(rb"serving on (http://[\d.]+:\d+)", log)):
                chunk = await process.stderr.receive_some()
                assert chunk, f"exited before serving: {log.decode()}"
                log += chunk
        yield Running(process, found.group(1).decode(), log)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stderr.aclose()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_serves_until_a_signal(signum):
    async with mock_provider("--seed", "3", "--latency-ms", "5") as running:
        async with httpx.AsyncClient(base_url=running.url) as client:
            assert (await client.get("/health")).status_code == 200
            reply = await client.post(PATHS["openai"], json=body_for("openai"))
            assert reply.status_code == 200
        running.process.send_signal(signum)
        with trio.fail_after(5):
            assert await running.wait() == 0
        assert b"shutting down" in running.log
        assert b"Traceback" not in running.log


async def test_a_stalled_stream_does_not_hold_up_shutdown():
    async with mock_provider() as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=None) as client:
            async with client.stream(
                "POST",
                PATHS["openai"],
                json=body_for("openai", stream=True),
                headers={"x-mock-fault": "stream_stall"},
            ) as response:
                assert response.status_code == 200
                started = trio.current_time()
                running.process.send_signal(signal.SIGINT)
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in response.aiter_raw():
                        pass
        with trio.fail_after(5):
            assert await running.wait() == 0
        # The stall is 30 s; the grace period is 1 s.
        assert trio.current_time() - started < 4


async def test_a_port_in_use_is_a_clear_error():
    async with mock_provider() as running:
        port = running.url.rsplit(":", 1)[1]
        result = await trio.run_process(
            [sys.executable, "-m", "mock_server", "--port", port],
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert b"cannot serve on 127.0.0.1:" + port.encode() in result.stderr
    assert b"Traceback" not in result.stderr


async def test_bad_arguments_are_refused():
    result = await trio.run_process(
        [sys.executable, "-m", "mock_server", "--latency-ms", "-5"],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"--latency-ms" in result.stderr
