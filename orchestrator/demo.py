"""``orchestrator demo``: the seed's five demo scenarios, run, narrated and checked.

::

    orchestrator demo                       # against running servers (:8001 and :8080)
    orchestrator demo --start               # starts its own mock and gateway, stops them after
    orchestrator demo --start --fast        # the same in a few seconds
    orchestrator demo --seed 1              # scenario 2 exactly as the guide tells it

Each scenario (``orchestrator.demo_scenarios``) resets the mock, configures it with the
seed's body, sends the seed's request, narrates the outcome with the guide's talking
points and prints a verdict, PASS or FAIL, with the evidence behind each check. The exit
status is 0 only when every scenario passed.

``--start`` serves a fresh mock and a gateway in this process, on free loopback ports,
in the same trio run; the gateway's journey log is captured, so the narration shows the
log lines to point out and the backoff waits exactly as the router chose them. Against
servers running elsewhere the evidence is what any client can see (headers, timings,
the gateway's ``/health``, the mock's ``/stats``).

``--fast`` changes configuration only: the mock's stall becomes 0.1 s instead of the
seed's 3 s (in scenario 2's body, as sent), and a gateway started with ``--start`` gets
a retry policy with a 0.2 s backoff base instead of 2 s. An external gateway keeps its
own waits: only the mock's side can be shortened from here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import httpx
import trio
from rich.console import Console

from mock_server import MockState
from mock_server import create_app as create_mock_app
from orchestrator import hosting
from orchestrator.config import Config, RetryPolicy
from orchestrator.demo_scenarios import SCENARIOS, run_scenario
from orchestrator.demo_session import Journal, Narrator, ScenarioResult, Session, Setup, recording_journeys
from orchestrator.server import serve_gateway
from providers.breaker import BreakerPolicy

__all__ = ["DemoError", "DemoOptions", "add_arguments", "gateway_config", "run", "run_demo", "start_servers"]

DEFAULT_MOCK_URL = "http://127.0.0.1:8001"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8080"
#: The seed's stall (scenario 2's ``timeout_duration_seconds``), and --fast's.
SEED_STALL_SECONDS = 3
FAST_STALL_SECONDS = 0.1
#: The backoff base of a gateway started with --start --fast (the default is 2 s).
FAST_BACKOFF_BASE = 0.2
#: Longer than any journey of the demo can take under the gateway's default 60 s deadline.
CLIENT_TIMEOUT = httpx.Timeout(75.0, connect=5.0)


class DemoError(Exception):
    """The demo could not run at all (a server unreachable, say); the message says why."""


@attrs.frozen
class DemoOptions:
    mock_url: str = DEFAULT_MOCK_URL
    gateway_url: str = DEFAULT_GATEWAY_URL
    start: bool = False
    fast: bool = False
    seed: int | None = None
    scenarios: tuple[int, ...] = tuple(scenario.number for scenario in SCENARIOS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run the seed's five demo scenarios, narrate them and check each one."
    parser.add_argument("--start", action="store_true",
                        help="start a mock and a gateway in this process (free loopback ports), stop them after")
    parser.add_argument("--fast", action="store_true",
                        help="shorten the mock's stalls (0.1 s) and, with --start, the gateway's backoff (0.2 s base)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed the mock's fault generator in scenario 2 (and, with --start, the backoff jitter)")
    parser.add_argument("--mock-url", default=None, help=f"a running mock provider (default {DEFAULT_MOCK_URL})")
    parser.add_argument("--gateway-url", default=None, help=f"a running gateway (default {DEFAULT_GATEWAY_URL})")
    parser.add_argument("--scenario", type=int, action="append", choices=range(1, len(SCENARIOS) + 1),
                        metavar="N", help="run only scenario N (repeatable; default: all five)")


def run(args: argparse.Namespace) -> int:
    """The ``demo`` command: 0 when every scenario passed, 1 otherwise, 2 on bad usage."""
    if args.start and (args.mock_url or args.gateway_url):
        print("orchestrator demo: --start serves its own mock and gateway;"
              " --mock-url and --gateway-url are for servers already running", file=sys.stderr)
        return 2
    options = DemoOptions(
        mock_url=(args.mock_url or DEFAULT_MOCK_URL).rstrip("/"),
        gateway_url=(args.gateway_url or DEFAULT_GATEWAY_URL).rstrip("/"),
        start=args.start,
        fast=args.fast,
        seed=args.seed,
        scenarios=tuple(sorted(set(args.scenario))) if args.scenario else DemoOptions().scenarios,
    )
    console = Console(highlight=False, soft_wrap=True)
    results: tuple[ScenarioResult, ...] = ()
    status = 1
    try:
        results = trio.run(run_demo, options, console)
    except* DemoError as group:
        for error in group.exceptions:
            print(f"orchestrator demo: {error}", file=sys.stderr)
    except* KeyboardInterrupt:
        status = 130
    if results and all(result.passed for result in results):
        status = 0
    return status


async def run_demo(options: DemoOptions, console: Console) -> tuple[ScenarioResult, ...]:
    """Run the chosen scenarios and return their results, in order.

    Blocks for the whole demo (up to half a minute with real timings). With ``start`` it
    serves the mock and the gateway for that time and stops them before returning.
    Raises :class:`DemoError` if the servers cannot be reached.
    """
    if not options.start:
        setup = _external_setup(options)
        return await _play(setup, options, console, journal=None)
    with recording_journeys() as journal:
        async with start_servers(options) as setup:
            return await _play(setup, options, console, journal=journal)


def gateway_config(mock_url: str, *, fast: bool, seed: int | None) -> Config:
    """The built-in demo configuration at ``mock_url``, with a short backoff when ``fast``."""
    config = Config.default(mock_url=mock_url)
    retry = RetryPolicy(backoff_base=FAST_BACKOFF_BASE) if fast else config.retry
    return attrs.evolve(config, retry=retry, seed=seed)


@asynccontextmanager
async def start_servers(options: DemoOptions) -> AsyncIterator[Setup]:
    """Serve a fresh mock and a gateway on free loopback ports for the block's duration.

    Nothing is shared with any other run: a new mock state, a new gateway service.
    Leaving the block cancels both at once; by then nothing is in flight.
    """
    async with trio.open_nursery() as nursery:
        [mock_url] = await nursery.start(partial(hosting.serve, create_mock_app(MockState.create()), port=0))
        config = gateway_config(mock_url, fast=options.fast, seed=options.seed)
        [gateway_url] = await nursery.start(partial(serve_gateway, config, port=0, handle_signals=False))
        route = config.route_for("gpt-4")
        assert route is not None  # the built-in configuration routes gpt-*
        try:
            yield Setup(
                mock_url=mock_url,
                gateway_url=gateway_url,
                stall_seconds=_stall(options),
                mock_seed=options.seed,
                max_attempts=config.retry_for(route).max_attempts,
                failure_threshold=config.provider("openai").breaker.failure_threshold,
                configured=True,
            )
        finally:
            nursery.cancel_scope.cancel()


def _external_setup(options: DemoOptions) -> Setup:
    return Setup(
        mock_url=options.mock_url,
        gateway_url=options.gateway_url,
        stall_seconds=_stall(options),
        mock_seed=options.seed,
        max_attempts=RetryPolicy().max_attempts,
        failure_threshold=BreakerPolicy().failure_threshold,
        configured=False,
    )


def _stall(options: DemoOptions) -> float:
    return FAST_STALL_SECONDS if options.fast else SEED_STALL_SECONDS


async def _play(
    setup: Setup, options: DemoOptions, console: Console, *, journal: Journal | None
) -> tuple[ScenarioResult, ...]:
    out = Narrator(console)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
        session = Session(setup, client, out, journal)
        await _check_reachable(client, setup)
        _introduce(out, setup, options)
        chosen = [scenario for scenario in SCENARIOS if scenario.number in options.scenarios]
        results = []
        for scenario in chosen:
            results.append(await run_scenario(session, scenario))
    _conclude(out, results)
    return tuple(results)


async def _check_reachable(client: httpx.AsyncClient, setup: Setup) -> None:
    for name, url, hint in (
        ("mock provider", setup.mock_url, "mock-provider"),
        ("gateway", setup.gateway_url, "orchestrator serve"),
    ):
        try:
            response = await client.get(f"{url}/health")
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise DemoError(
                f"cannot reach the {name} at {url} ({type(error).__name__}: {error})."
                f" Start it ({hint}, or `make run` for both), or run `orchestrator demo --start`."
            ) from None


def _introduce(out: Narrator, setup: Setup, options: DemoOptions) -> None:
    where = "started here, free loopback port" if options.start else "already running"
    out.heading("orchestrator demo: the seed's five scenarios, checked")
    out.say(f"mock     {setup.mock_url}  ({where})")
    out.say(f"gateway  {setup.gateway_url}  ({where})")
    if options.fast and options.start:
        out.say(f"--fast: the mock stalls {FAST_STALL_SECONDS} s instead of {SEED_STALL_SECONDS} s;"
                f" the gateway's backoff base is {FAST_BACKOFF_BASE} s instead of 2 s (configuration only)")
    elif options.fast:
        out.say(f"--fast: the mock stalls {FAST_STALL_SECONDS} s instead of {SEED_STALL_SECONDS} s;"
                " the gateway's backoff is its own configuration, which this runner cannot shorten")
    else:
        out.say("real timings: the seed's 3 s stalls and the gateway's own backoff (2 s base by default)")
    if setup.configured:
        out.say("evidence: response headers and timings, the gateway's /health, the mock's /stats,"
                " and the gateway's journey log (captured in this process)")
    else:
        out.say("evidence: response headers and timings, the gateway's /health and the mock's /stats;"
                f" assuming the gateway's defaults ({setup.max_attempts} attempts per provider,"
                f" circuit opens after {setup.failure_threshold} failures)")
    out.say("before each scenario the mock is reset: both profiles healthy, statistics zeroed")


def _conclude(out: Narrator, results: list[ScenarioResult]) -> None:
    passed = sum(result.passed for result in results)
    failed = [str(result.number) for result in results if not result.passed]
    out.heading(f"{passed} of {len(results)} scenarios passed"
                + (f"; FAILED: scenario {', '.join(failed)}" if failed else ""))
