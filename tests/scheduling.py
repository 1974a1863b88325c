"""How often a task gives the scheduler back control, for tests that pin hops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Suspensions(trio.abc.Instrument):
    """Counts the times ``task`` gave control back (``count``), and the steps trio ran
    per task name (``by_name``: the name's last dotted part, a spawned function's name)."""

    def __init__(self, task: trio.lowlevel.Task | None = None) -> None:
        self.task = task
        self.count = 0
        self.by_name: dict[str, int] = {}

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1
        name = task.name.rsplit(".", 1)[-1]
        self.by_name[name] = self.by_name.get(name, 0) + 1


@contextmanager
def counting_suspensions() -> Iterator[Suspensions]:
    """Count, while the block runs, the current task's suspensions and every task's steps."""
    suspensions = Suspensions(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(suspensions)
    try:
        yield suspensions
    finally:
        trio.lowlevel.remove_instrument(suspensions)
