"""orchestrator.asgi.read_body, fed through a trio memory channel as hypercorn feeds it."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from orchestrator.asgi import read_body
from orchestrator.errors import BodyTimeout, BodyTooLarge


def queued(*messages: dict[str, Any]) -> trio.MemoryReceiveChannel[dict[str, Any]]:
    send, receive = trio.open_memory_channel[dict[str, Any]](len(messages) + 1)
    for message in messages:
        send.send_nowait(message)
    return receive


def request(body: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_already_here_whole_is_returned_without_waiting():
    receive = queued(request(b'{"a":1}'))
    with trio.CancelScope() as scope:
        scope.cancel()  # it must not even reach a checkpoint
        assert await read_body(receive.receive, None, limit=100, timeout=1.0) == b'{"a":1}'


async def test_a_body_already_here_over_the_limit_is_refused():
    with pytest.raises(BodyTooLarge):
        await read_body(queued(request(b"x" * 101)).receive, None, limit=100, timeout=1.0)


async def test_a_body_in_pieces_is_joined_and_bounded(autojump_clock):
    assert await read_body(queued(request(b"ab", True), request(b"cd")).receive, None, limit=4, timeout=1.0) == b"abcd"
    with pytest.raises(BodyTooLarge):
        await read_body(queued(request(b"abc", True), request(b"de")).receive, None, limit=4, timeout=1.0)


async def test_a_body_that_stops_arriving_times_out(autojump_clock):
    with pytest.raises(BodyTimeout):
        await read_body(queued(request(b"ab", True)).receive, None, limit=100, timeout=1.0)


async def test_a_client_that_leaves_first_gets_none(autojump_clock):
    assert await read_body(queued({"type": "http.disconnect"}).receive, None, limit=100, timeout=1.0) is None
    assert await read_body(queued(request(b"ab", True), {"type": "http.disconnect"}).receive, None,
                           limit=100, timeout=1.0) is None
