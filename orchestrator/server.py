"""Run the gateway: the service and hypercorn in one trio run, one nursery.

If a provider actor dies, the service's nursery cancels the server with it and the
process exits with the error: a gateway never serves on without its providers.
SIGINT/SIGTERM stop accepting connections, give in-flight requests the grace period
(by default the request deadline, so every request can finish), then cancel; a
second signal cancels at once.

``--with-mock`` also serves the mock provider in the same run (``make run``), so one
Ctrl-C stops both cleanly.

**Workers** (``run_gateway(..., workers=N)``, ``orchestrator serve --workers N``): the
parent binds N ``SO_REUSEPORT`` listeners on the port, forks N worker processes and
supervises them; it serves nothing itself (but the mock, with ``--with-mock``). Each
worker is a whole gateway -- its own trio run, provider actors, circuit breakers,
limits and statistics; they share nothing but the port, and the kernel spreads new
connections over them. The parent owns shutdown: workers ignore SIGINT/SIGTERM (a
Ctrl-C reaches the whole process group) and obey the parent over a socket pair
instead, so each gets exactly one graceful stop. A worker that exits unasked stops
the others and makes the parent exit non-zero; a worker that outlives the grace
period is killed; a worker whose parent is gone stops gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import trio
from hypercorn.utils import repr_socket_addr

from orchestrator import hosting
from orchestrator.app import create_app
from orchestrator.config import Config
from orchestrator.service import open_orchestrator

__all__ = ["run_gateway", "run_workers", "serve_gateway"]

logger = logging.getLogger("orchestrator.server")

#: The mock's in-flight answers (a long stall, say) get this long after Ctrl-C.
MOCK_GRACE = 1.0
#: A worker still running this long after its grace period is killed.
KILL_MARGIN = 5.0

#: Parent -> worker over the control socket: stop gracefully / stop now.
#: Worker -> parent: serving. End of file either way: the other side is gone.
_STOP, _STOP_NOW, _READY = b"g", b"n", b"r"


async def serve_gateway(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    handle_signals: bool = True,
    sockets: list[socket.socket] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until ``shutdown_trigger`` returns, a signal arrives (with
    ``handle_signals``), or the caller cancels. Reports the bound URLs through
    ``task_status`` (``port=0`` binds a free port; ``sockets``, already listening,
    replace binding)."""
    async with open_orchestrator(config, transport=transport) as gw:
        app = create_app(gw)
        options = dict(
            host=host,
            port=port,
            sockets=sockets,
            graceful_timeout=config.grace_period,
            keep_alive_timeout=config.keep_alive,
            send_timeout=config.send_timeout,
            task_status=task_status,
        )
        if handle_signals:
            await hosting.serve_until_signalled(app, **options)
        else:
            await hosting.serve(app, shutdown_trigger=shutdown_trigger, **options)


async def serve_with_mock(config: Config, *, host: str, port: int, mock_port: int, mock_seed: int | None) -> None:
    """The mock provider and the gateway in one run, both stopped by one signal."""
    from mock_server import MockState
    from mock_server import create_app as create_mock_app

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hosting.watch_signals, signals, stopping, nursery.cancel_scope)
            mock = create_mock_app(MockState.create(seed=mock_seed))
            await nursery.start(
                partial(hosting.serve, mock, host=host, port=mock_port, graceful_timeout=MOCK_GRACE,
                        shutdown_trigger=stopping.wait)
            )
            await serve_gateway(config, host=host, port=port, shutdown_trigger=stopping.wait, handle_signals=False)
            nursery.cancel_scope.cancel()


def run_gateway(
    config: Config,
    *,
    host: str,
    port: int,
    workers: int = 1,
    mock_port: int | None = None,
    mock_seed: int | None = None,
) -> int:
    """Block serving the gateway (and the mock, given ``mock_port``) until SIGINT/SIGTERM.

    Returns the exit status: 0 after a requested stop, 1 if a worker failed. Raises
    ``OSError`` if an address cannot be bound. It is the process's whole life: the
    garbage collector is set up for serving first (``hosting.tune_collector_for_serving``).
    """
    hosting.tune_collector_for_serving()
    if workers > 1:
        return run_workers(config, host=host, port=port, workers=workers, mock_port=mock_port, mock_seed=mock_seed)
    if mock_port is None:
        trio.run(partial(serve_gateway, config, host=host, port=port))
    else:
        trio.run(partial(serve_with_mock, config, host=host, port=port, mock_port=mock_port, mock_seed=mock_seed))
    return 0


# -- several worker processes -------------------------------------------------------


def run_workers(
    config: Config,
    *,
    host: str,
    port: int,
    workers: int,
    mock_port: int | None = None,
    mock_seed: int | None = None,
) -> int:
    """Fork ``workers`` gateway processes on one port and supervise them until they stop.

    Binds every socket before forking, so a busy port fails here, with ``OSError``,
    before any worker exists. Blocks until every worker has exited; returns 0 if they
    all stopped cleanly when asked, else 1.
    """
    listeners = hosting.bind_sockets(host, port, count=workers)
    mock_sockets: list[socket.socket] = []
    try:
        if mock_port is not None:
            mock_sockets = hosting.bind_sockets(host, mock_port)
        address = repr_socket_addr(listeners[0].family, listeners[0].getsockname())
        supervisor = _Supervisor(f"http://{address}", config.grace_period)
        for index, listener in enumerate(listeners):
            supervisor.fork(index, listener, inherited=[*listeners, *mock_sockets], config=config)
    finally:
        for listener in listeners:
            listener.close()  # the workers hold their own; an unaccepted port must not linger
    return trio.run(partial(supervisor.run, mock_sockets, mock_seed))


class _Worker:
    """The parent's view of one worker process."""

    def __init__(self, index: int, pid: int, control: socket.socket) -> None:
        self.index = index
        self.pid = pid
        self.control = control
        self.exited = False

    def tell(self, message: bytes) -> None:
        """Send a command (never blocks: one byte into an empty socket buffer)."""
        if not self.exited:
            with contextlib.suppress(OSError):  # it died just now: _watch reports that
                self.control.send(message)


class _Supervisor:
    """Forks the workers (before any trio run), then watches them in one (``run``)."""

    def __init__(self, url: str, grace_period: float) -> None:
        self._url = url
        self._grace = grace_period
        self._workers: list[_Worker] = []
        self._ready = 0
        self._stopping = False
        self._failed = False

    def fork(self, index: int, listener: socket.socket, *, inherited: list[socket.socket], config: Config) -> None:
        """Start worker ``index`` serving on ``listener``; the child never returns here."""
        parent_end, worker_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker: keep only its own listener and control socket
            parent_end.close()
            for worker in self._workers:
                worker.control.close()
            for sock in inherited:
                if sock is not listener:
                    sock.close()
            os._exit(_worker_main(index, config, listener, worker_end))
        worker_end.close()
        self._workers.append(_Worker(index, pid, parent_end))

    async def run(self, mock_sockets: list[socket.socket], mock_seed: int | None) -> int:
        """Supervise until every worker has exited; return the exit status.

        Blocks on signals and on the workers' readiness and exits; given
        ``mock_sockets``, serves the mock until the last worker is gone, so workers
        finishing in-flight requests still reach it.
        """
        all_exited = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_signals, signals, nursery)
                if mock_sockets:
                    await nursery.start(partial(_serve_mock, mock_sockets, mock_seed, all_exited.wait))
                async with trio.open_nursery() as watchers:
                    for worker in self._workers:
                        watchers.start_soon(self._watch, worker, nursery)
                all_exited.set()
                nursery.cancel_scope.cancel()
        return 1 if self._failed else 0

    def _stop(self, nursery: trio.Nursery, *, now: bool = False) -> None:
        if not self._stopping:
            self._stopping = True
            nursery.start_soon(self._kill_stragglers)
        for worker in self._workers:
            worker.tell(_STOP_NOW if now else _STOP)

    async def _relay_signals(self, signals: object, nursery: trio.Nursery) -> None:
        async for signum in signals:  # type: ignore[attr-defined]
            name = signal.Signals(signum).name
            if self._stopping:
                logger.warning("second %s: stopping the workers now", name)
                self._stop(nursery, now=True)
            else:
                logger.info("%s: stopping %d workers gracefully", name, len(self._workers))
                self._stop(nursery)

    async def _watch(self, worker: _Worker, nursery: trio.Nursery) -> None:
        """Wait for the worker to report ready, then to exit; reap it and judge it."""
        control = trio.socket.from_stdlib_socket(worker.control)
        if await control.recv(1) == _READY:  # end of file instead: it exited first
            self._ready += 1
            if self._ready == len(self._workers):
                pids = ", ".join(str(each.pid) for each in self._workers)
                logger.info("serving on %s with %d workers (pids %s)", self._url, len(self._workers), pids)
        pidfd = os.pidfd_open(worker.pid)  # readable once the process has exited: no polling
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        _, status = os.waitpid(worker.pid, 0)
        worker.exited = True
        control.close()
        code = os.waitstatus_to_exitcode(status)
        if self._stopping and code == 0:
            logger.info("worker %d (pid %d) stopped", worker.index, worker.pid)
            return
        self._failed = True
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if self._stopping:
            logger.error("worker %d (pid %d) stopped with %s", worker.index, worker.pid, how)
        else:
            logger.error("worker %d (pid %d) died with %s: stopping the others", worker.index, worker.pid, how)
            self._stop(nursery)

    async def _kill_stragglers(self) -> None:
        await trio.sleep(self._grace + KILL_MARGIN)
        for worker in self._workers:
            if not worker.exited:
                logger.error("worker %d (pid %d) outlived the grace period: killing it", worker.index, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)


async def _serve_mock(
    sockets: list[socket.socket],
    seed: int | None,
    stopped: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    from mock_server import MockState
    from mock_server import create_app as create_mock_app

    await hosting.serve(create_mock_app(MockState.create(seed=seed)), sockets=sockets, graceful_timeout=MOCK_GRACE,
                        shutdown_trigger=stopped, task_status=task_status)


def _worker_main(index: int, config: Config, listener: socket.socket, control: socket.socket) -> int:
    """A forked worker's whole life; returns its exit status (never raises)."""
    # The parent decides when workers stop: a terminal's Ctrl-C reaches every process
    # of the group, and a second signal here would cut the graceful stop short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        trio.run(partial(_serve_worker, config, listener, control))
    except (Exception, KeyboardInterrupt):  # trio.run has ended: no Cancelled can be here
        logger.exception("worker %d (pid %d) failed", index, os.getpid())
        return 1
    finally:
        logging.shutdown()  # flush: os._exit skips interpreter clean-up
    return 0


async def _serve_worker(config: Config, listener: socket.socket, control: socket.socket) -> None:
    """Serve on ``listener`` until the parent says stop (or disappears)."""
    control_socket = trio.socket.from_stdlib_socket(control)
    stopping = trio.Event()
    with control_socket:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_until_stopped, config, listener, stopping, nursery.cancel_scope)
            await control_socket.send(_READY)
            await _obey_parent(control_socket, stopping, nursery.cancel_scope)


async def _serve_until_stopped(
    config: Config,
    listener: socket.socket,
    stopping: trio.Event,
    everything: trio.CancelScope,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_gateway(config, sockets=[listener], shutdown_trigger=stopping.wait, handle_signals=False,
                        task_status=task_status)
    everything.cancel()  # served out: stop listening to the parent too


async def _obey_parent(control: trio.socket.SocketType, stopping: trio.Event, everything: trio.CancelScope) -> None:
    """Stop gracefully on the parent's first word or its disappearance; at once on "now"."""
    while True:
        message = await control.recv(1)
        if message == _STOP_NOW:
            everything.cancel()
            return
        stopping.set()
        if not message:  # end of file: the parent is gone, and nobody can say "now"
            return
