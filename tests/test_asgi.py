"""orchestrator.asgi.read_body, fed as the server feeds it: through an AppQueue
(orchestrator.http1) or a trio memory channel (hypercorn's own protocols)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from orchestrator.appqueue import AppQueue
from orchestrator.asgi import read_body
from orchestrator.errors import BodyTimeout, BodyTooLarge

Queued = Callable[..., Awaitable[Any]]


@pytest.fixture(params=["appqueue", "channel"])
def queued(request: pytest.FixtureRequest) -> Queued:
    """Makes what a request's ``receive`` belongs to, with the messages given in it."""

    async def make(*messages: dict[str, Any]) -> Any:
        if request.param == "appqueue":
            queue = AppQueue(len(messages) + 1)
            for message in messages:
                await queue.send(message)
            return queue
        send, receive = trio.open_memory_channel[dict[str, Any]](len(messages) + 1)
        for message in messages:
            send.send_nowait(message)
        return receive

    return make


def request(body: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_already_here_whole_is_returned_without_waiting(queued: Queued):
    receive = (await queued(request(b'{"a":1}'))).receive
    with trio.CancelScope() as scope:
        scope.cancel()  # it must not even reach a checkpoint
        assert await read_body(receive, None, limit=100, timeout=1.0) == b'{"a":1}'


async def test_a_body_already_here_over_the_limit_is_refused(queued: Queued):
    receive = (await queued(request(b"x" * 101))).receive
    with pytest.raises(BodyTooLarge):
        await read_body(receive, None, limit=100, timeout=1.0)


async def test_a_body_in_pieces_is_joined_and_bounded(queued: Queued, autojump_clock):
    receive = (await queued(request(b"ab", True), request(b"cd"))).receive
    assert await read_body(receive, None, limit=4, timeout=1.0) == b"abcd"
    receive = (await queued(request(b"abc", True), request(b"de"))).receive
    with pytest.raises(BodyTooLarge):
        await read_body(receive, None, limit=4, timeout=1.0)


async def test_a_body_that_stops_arriving_times_out(queued: Queued, autojump_clock):
    receive = (await queued(request(b"ab", True))).receive
    with pytest.raises(BodyTimeout):
        await read_body(receive, None, limit=100, timeout=1.0)


async def test_a_client_that_leaves_first_gets_none(queued: Queued, autojump_clock):
    receive = (await queued({"type": "http.disconnect"})).receive
    assert await read_body(receive, None, limit=100, timeout=1.0) is None
    receive = (await queued(request(b"ab", True), {"type": "http.disconnect"})).receive
    assert await read_body(receive, None, limit=100, timeout=1.0) is None
