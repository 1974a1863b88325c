"""The queue that carries a request's ASGI messages from the connection to its app.

hypercorn's ``spawn_app`` makes a trio memory channel for every request: the
request's body and, later, ``http.disconnect`` go through it. A channel is general --
clones, statistics, close, wait queues kept in ordered dicts -- and that cost about
1.4 KiB per request in flight (tracemalloc, 500 parked) and some CPU on every one.
:class:`AppQueue` is the same bounded first-in first-out queue in one slotted object:
what the connection calls ``app_put`` is :meth:`AppQueue.send`, what the app calls
``receive`` is :meth:`AppQueue.receive`. Nothing closes it: a request's queue lives as
long as the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio
from hypercorn.config import Config
from hypercorn.trio.task_group import _handle
from hypercorn.typing import AppWrapper, ASGISendEvent, Scope, TaskGroup
from trio.lowlevel import (
    Abort,
    Task,
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

__all__ = ["AppQueue", "AppSpawner"]

Message = dict[str, Any]


class AppQueue:
    """A bounded queue of ASGI messages, ``max_size`` long (0: each send waits for a receive).

    ``send`` blocks while the queue is full, ``receive`` while it is empty; both are
    cancellable, and a cancelled one leaves the queue as it was. ``send`` is a
    scheduling point, as a trio channel's is, except in the task that takes the
    messages (see ``send``); ``receive`` only when it waits (the app has one soon
    after: its answer's socket write).
    """

    __slots__ = ("_consumer", "_messages", "_max_size", "_receivers", "_senders")

    def __init__(self, max_size: int) -> None:
        self._messages: list[Message] = []
        self._max_size = max_size
        self._receivers: list[Task] = []  # waiting for a message: only when none is queued
        self._senders: list[tuple[Task, Message]] = []  # waiting for room: only when full
        self._consumer: Task | None = None  # the task that last asked for a message

    @property
    def full(self) -> bool:
        """No room: a ``send`` now would wait for the app to take a message."""
        return len(self._messages) >= self._max_size and not self._receivers

    @property
    def senders_waiting(self) -> int:
        return len(self._senders)

    async def send(self, message: Message) -> None:
        """Queue ``message``; blocks while the queue is full."""
        await checkpoint_if_cancelled()
        if self._receivers or len(self._messages) < self._max_size:
            if self._receivers:
                reschedule(self._receivers.pop(0), outcome.Value(message))
            else:
                self._messages.append(message)
            # As a trio channel's send does: let the app run before the read loop goes
            # on. It answers before the read loop next looks at the socket, which then
            # finds the client's next request already there instead of waiting for it.
            # Not when the app sends to itself (``http.disconnect``, queued from its own
            # last ``send`` once its response is out): it would only wait a pass to end.
            if current_task() is not self._consumer:
                await cancel_shielded_checkpoint()
            return
        task = current_task()
        waiting = (task, message)
        self._senders.append(waiting)

        def abort(_: object) -> Abort:
            self._senders.remove(waiting)
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    def receive_nowait(self) -> Message:
        """The next message; raises ``trio.WouldBlock`` if there is none yet."""
        self._consumer = current_task()
        if self._messages:
            message = self._messages.pop(0)
            if self._senders:  # room for the longest-waiting sender's message
                task, waiting = self._senders.pop(0)
                self._messages.append(waiting)
                reschedule(task)
            return message
        if self._senders:  # max_size 0: straight from a waiting sender
            task, message = self._senders.pop(0)
            reschedule(task)
            return message
        raise trio.WouldBlock

    async def receive(self) -> Message:
        """The next message; blocks until there is one."""
        await checkpoint_if_cancelled()
        try:
            return self.receive_nowait()
        except trio.WouldBlock:
            pass
        task = current_task()
        self._receivers.append(task)

        def abort(_: object) -> Abort:
            self._receivers.remove(task)
            return Abort.SUCCEEDED

        return await wait_task_rescheduled(abort)  # type: ignore[no-any-return]


class AppSpawner:
    """What an ``HTTPStream`` is given as its task group: hypercorn's ``task_group``,
    whose ``spawn_app`` gives each request an :class:`AppQueue` instead of a channel."""

    __slots__ = ("_task_group",)

    def __init__(self, task_group: TaskGroup) -> None:
        self._task_group = task_group

    async def spawn_app(
        self, app: AppWrapper, config: Config, scope: Scope, send: Callable[[ASGISendEvent | None], Awaitable[None]]
    ) -> Callable[[Message], Awaitable[None]]:
        """Start ``app`` for one request, as hypercorn's ``spawn_app`` does; returns
        what puts a message on its queue (``HTTPStream.app_put``)."""
        queue = AppQueue(config.max_app_queue_size)
        self._task_group.spawn(
            _handle, app, config, scope, queue.receive, send, trio.to_thread.run_sync, trio.from_thread.run
        )
        return queue.send

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._task_group.spawn(func, *args)
