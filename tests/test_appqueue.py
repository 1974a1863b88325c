"""orchestrator.appqueue.AppQueue: a request's ASGI messages, in order, within a bound."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from orchestrator.appqueue import AppQueue
from scheduling import counting_suspensions


def message(n: int) -> dict[str, object]:
    return {"type": "http.request", "body": b"%d" % n, "more_body": True}


async def test_messages_come_out_in_order_without_waiting_while_there_is_room():
    queue = AppQueue(3)
    for n in range(3):
        await queue.send(message(n))
    assert queue.full
    assert [queue.receive_nowait() for _ in range(2)] == [message(0), message(1)]
    assert await queue.receive() == message(2)
    with pytest.raises(trio.WouldBlock):
        queue.receive_nowait()
    assert not queue.full


async def test_a_receive_waits_for_the_next_message(autojump_clock):
    queue = AppQueue(2)
    received = []

    async def receiver() -> None:
        received.append(await queue.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.sleep(1)
        assert received == []
        assert not queue.full  # a receiver is waiting: a send now goes straight to it
        await queue.send(message(7))
    assert received == [message(7)]


async def test_a_send_to_a_full_queue_waits_for_room_and_keeps_its_place(autojump_clock):
    queue = AppQueue(1)
    await queue.send(message(0))
    sent = []

    async def sender(n: int) -> None:
        await queue.send(message(n))
        sent.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, 1)
        await trio.sleep(1)
        nursery.start_soon(sender, 2)
        await trio.sleep(1)
        assert sent == [] and queue.senders_waiting == 2
        assert await queue.receive() == message(0)
        await trio.sleep(1)
        assert sent == [1] and queue.senders_waiting == 1
        assert [await queue.receive(), await queue.receive()] == [message(1), message(2)]
    assert sent == [1, 2] and queue.senders_waiting == 0


async def test_without_room_each_send_meets_a_receive(autojump_clock):
    queue = AppQueue(0)
    assert queue.full
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.send, message(0))
        await trio.sleep(1)
        assert queue.senders_waiting == 1
        assert queue.receive_nowait() == message(0)
    assert queue.senders_waiting == 0


async def test_a_cancelled_wait_leaves_the_queue_as_it_was(autojump_clock):
    queue = AppQueue(1)
    with trio.move_on_after(1):
        await queue.receive()
    await queue.send(message(0))  # no receiver left behind to take it
    with trio.move_on_after(1) as waited:
        await queue.send(message(1))
    assert waited.cancelled_caught and queue.senders_waiting == 0
    assert queue.receive_nowait() == message(0)
    with pytest.raises(trio.WouldBlock):
        queue.receive_nowait()  # the cancelled send's message was never queued


async def test_a_cancelled_scope_stops_a_send_and_a_receive_before_they_act():
    queue = AppQueue(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.send(message(0))
    assert scope.cancelled_caught
    with pytest.raises(trio.WouldBlock):
        queue.receive_nowait()
    await queue.send(message(1))
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.receive()
    assert scope.cancelled_caught and queue.receive_nowait() == message(1)



async def test_a_send_lets_the_app_run_first_unless_the_app_itself_sends():
    # The connection's send yields, so the app answers before the read loop goes on;
    # the app's own (its http.disconnect, queued from its last send) has nobody to wait for.
    queue = AppQueue(4)
    with counting_suspensions() as suspensions:
        await queue.send(message(0))  # this task has not taken a message: not the app
    assert suspensions.count == 1
    assert queue.receive_nowait() == message(0)  # now it is the task that takes them
    with counting_suspensions() as suspensions:
        await queue.send(message(1))
    assert suspensions.count == 0
    assert queue.receive_nowait() == message(1)
