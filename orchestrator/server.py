"""Run the gateway: the service and hypercorn in one trio run, one nursery.

If a provider actor dies, the service's nursery cancels the server with it and the
process exits with the error: a gateway never serves on without its providers.
SIGINT/SIGTERM stop accepting connections, give in-flight requests the grace period
(by default the request deadline, so every request can finish), then cancel; a
second signal cancels at once.

``--with-mock`` also serves the mock provider in the same run (``make run``), so one
Ctrl-C stops both cleanly.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import trio

from orchestrator import hosting
from orchestrator.app import create_app
from orchestrator.config import Config
from orchestrator.service import open_orchestrator

__all__ = ["run_gateway", "serve_gateway"]

logger = logging.getLogger("orchestrator.server")

#: The mock's in-flight answers (a long stall, say) get this long after Ctrl-C.
MOCK_GRACE = 1.0


async def serve_gateway(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    handle_signals: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until ``shutdown_trigger`` returns, a signal arrives (with
    ``handle_signals``), or the caller cancels. Reports the bound URLs through
    ``task_status`` (``port=0`` binds a free port)."""
    async with open_orchestrator(config, transport=transport) as gw:
        app = create_app(gw)
        options = dict(
            host=host,
            port=port,
            graceful_timeout=config.grace_period,
            keep_alive_timeout=config.keep_alive,
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
            nursery.start_soon(_watch_signals, signals, stopping, nursery.cancel_scope)
            mock = create_mock_app(MockState.create(seed=mock_seed))
            await nursery.start(
                partial(hosting.serve, mock, host=host, port=mock_port, graceful_timeout=MOCK_GRACE,
                        shutdown_trigger=stopping.wait)
            )
            await serve_gateway(config, host=host, port=port, shutdown_trigger=stopping.wait, handle_signals=False)
            nursery.cancel_scope.cancel()


async def _watch_signals(signals: object, stopping: trio.Event, everything: trio.CancelScope) -> None:
    async for signum in signals:  # type: ignore[attr-defined]
        if stopping.is_set():
            logger.warning("second %s: stopping now", signal.Signals(signum).name)
            everything.cancel()
            return
        logger.info("%s: shutting down gracefully", signal.Signals(signum).name)
        stopping.set()


def run_gateway(
    config: Config, *, host: str, port: int, mock_port: int | None = None, mock_seed: int | None = None
) -> None:
    """Block serving the gateway (and the mock, given ``mock_port``) until SIGINT/SIGTERM."""
    if mock_port is None:
        trio.run(partial(serve_gateway, config, host=host, port=port))
    else:
        trio.run(partial(serve_with_mock, config, host=host, port=port, mock_port=mock_port, mock_seed=mock_seed))
