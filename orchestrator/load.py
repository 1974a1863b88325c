"""``orchestrator load``: fire concurrent requests at a gateway and report what happened.

::

    orchestrator load [--url URL] [--bursts N] [--concurrency C] [--interval S]
    orchestrator load [--url URL] --rate R [--duration S] [--concurrency CAP]
        common: [--model M] [--stream [FRACTION]] [--timeout S] [--seed N]
                [--json PATH|-] [--mock-url URL]

Two modes:

- **bursts** (the default: 5 bursts of 10, 1 s apart): each burst fires ``--concurrency``
  requests at once and waits for every one of them to finish; the next burst starts
  ``--interval`` seconds after the previous one has finished.
- **open loop** (``--rate R --duration S``): request *i* is due at ``i / R`` seconds, for
  ``round(R * S)`` requests, however long earlier ones take, so a slow gateway does not
  slow the sender. At most ``--concurrency`` requests (default 256) are in flight; a
  request due while that cap is full is not sent and is counted as ``not_sent``, and one
  that starts more than ``1 / R`` after its due time (the sender fell behind) as ``late``.

Each request is ``POST /v1/chat/completions`` with a small body (``--model``, default
``gpt-4``; a short prompt drawn from ``--seed``). ``--stream`` streams every request;
``--stream 0.3`` streams a seeded 30% of them. Streams are read to the end. ``--timeout``
(default 90 s, longer than the gateway's 60 s deadline) bounds each request as a whole on
the client's side. All requests share one ``httpx.AsyncClient`` holding ``--concurrency``
keep-alive connections in pools of at most eight (httpcore scans every connection of a
pool on each request, so one big pool made this script the busiest process on the
machine), with no retries and no proxy settings from the environment.

``--mock-url`` reads the mock provider's ``GET /stats`` before and after the run and
reports the upstream requests per request sent beside the gateway's own count (from its
``x-orchestrator-attempts`` headers). They agree unless something else uses the mock
meanwhile, requests are lost (their attempts are unknown to the client), or a stream is
continued after its commit point (those attempts happen after the headers were sent).

The report (definitions, text and JSON shape: :mod:`orchestrator.loadreport`) goes to
stdout, or to stderr with ``--json -``. Progress goes to stderr: a live bar on a
terminal, plain lines otherwise. Exit status: 0; 1 when a request was lost or an answer
truncated; 2 for invalid arguments; 3 when no report could be produced (the mock's
``/stats`` unreadable, the JSON file not writable); 130 when interrupted.

In-process (tests, other trio programs): ``report = await run_load(LoadOptions(...))``.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import itertools
import math
import os
import random
import re
import secrets
import sys
from collections import defaultdict
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal, Protocol, TextIO

import attrs
import httpx
import orjson
import trio

from orchestrator.loadreport import LoadReport, Outcome, Percentiles, Result, Schedule, Summary, Upstream

__all__ = [
    "LoadError",
    "LoadOptions",
    "UsageError",
    "add_arguments",
    "discover_primary",
    "exchange",
    "primary_for",
    "read_mock_stats",
    "run",
    "run_load",
]

CHAT_PATH = "/v1/chat/completions"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_BURSTS, DEFAULT_BURST_SIZE, DEFAULT_INTERVAL = 5, 10, 1.0
DEFAULT_DURATION, DEFAULT_IN_FLIGHT_CAP = 10.0, 256
DEFAULT_TIMEOUT = 90.0
#: Below the servers' 5 s keep-alive timeout, so the pool never reuses a connection the
#: server is closing at that very moment (that request would look lost).
KEEPALIVE_EXPIRY = 4.0
#: Connections per pool: small pools keep httpcore's per-request scan short.
CONNECTIONS_PER_POOL = 8
#: Bound on the side requests (``/v1/models``, the mock's ``/stats``).
SIDE_REQUEST_TIMEOUT = 5.0
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


class UsageError(ValueError):
    """The arguments contradict each other or are out of range; the message says which."""


class LoadError(Exception):
    """The run cannot produce a report (the mock's statistics could not be read)."""


# -- options ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``load`` subcommand's arguments. Mode flags default to None so that
    :meth:`LoadOptions.from_args` can tell what was given from what was not."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway's base URL (default {DEFAULT_URL})")
    bursts = parser.add_argument_group("bursts (the default mode)")
    bursts.add_argument("--bursts", type=int, metavar="N", help=f"number of bursts (default {DEFAULT_BURSTS})")
    bursts.add_argument(
        "--concurrency", type=int, metavar="C",
        help=f"requests per burst (default {DEFAULT_BURST_SIZE}); "
        f"with --rate, the most requests in flight (default {DEFAULT_IN_FLIGHT_CAP})",
    )
    bursts.add_argument("--interval", type=float, metavar="S",
                        help=f"seconds between one burst's end and the next one's start (default {DEFAULT_INTERVAL:g})")
    open_loop = parser.add_argument_group("open loop")
    open_loop.add_argument("--rate", type=float, metavar="R", help="requests started per second, on a fixed schedule")
    open_loop.add_argument("--duration", type=float, metavar="S",
                           help=f"seconds of scheduled sending (default {DEFAULT_DURATION:g})")
    parser.add_argument("--model", default="gpt-4", help="the model asked for (default gpt-4)")
    parser.add_argument("--stream", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                        help="stream the answers (all of them, or this seeded fraction of the requests)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"client-side limit per request, seconds (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--seed", type=int, help="seeds prompts and stream choices (default: drawn, then reported)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the report as JSON ('-': stdout)")
    parser.add_argument("--mock-url", metavar="URL",
                        help="the mock provider's base URL: report its /stats counts per request")
    parser.add_argument("--api-key", metavar="KEY",
                        help="sent as 'Authorization: Bearer KEY' (default: $ORCHESTRATOR_API_KEY, else none)")


@attrs.frozen
class LoadOptions:
    """One load run, checked. Build it with :meth:`for_bursts`, :meth:`for_rate` or
    :meth:`from_args`; each raises :class:`UsageError` for values out of range."""

    mode: Literal["bursts", "rate"]
    concurrency: int
    bursts: int | None = None
    interval: float | None = None
    rate: float | None = None
    duration: float | None = None
    url: str = DEFAULT_URL
    model: str = "gpt-4"
    stream: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    seed: int = attrs.field(factory=lambda: secrets.randbelow(2**31))
    json_path: str | None = None
    mock_url: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        _check(self.concurrency >= 1, "--concurrency must be at least 1")
        _check(0.0 <= self.stream <= 1.0, "--stream takes a fraction between 0 and 1")
        _check(self.timeout > 0, "--timeout must be positive")
        for name, url in (("--url", self.url), ("--mock-url", self.mock_url)):
            _check(url is None or url.startswith(("http://", "https://")), f"{name} must start with http://")
        if self.mode == "bursts":
            _check(self.bursts is not None and self.bursts >= 1, "--bursts must be at least 1")
            _check(self.interval is not None and self.interval >= 0, "--interval must not be negative")
            _check(self.rate is None and self.duration is None, "burst mode takes no --rate or --duration")
        else:
            _check(self.rate is not None and self.rate > 0, "--rate must be positive")
            _check(self.duration is not None and self.duration > 0, "--duration must be positive")
            _check(self.bursts is None and self.interval is None, "open-loop mode takes no --bursts or --interval")
            _check(self.planned >= 1, "--rate times --duration plans no request at all")

    @classmethod
    def for_bursts(
        cls,
        bursts: int = DEFAULT_BURSTS,
        concurrency: int = DEFAULT_BURST_SIZE,
        interval: float = DEFAULT_INTERVAL,
        **common: Any,
    ) -> LoadOptions:
        return cls(mode="bursts", bursts=bursts, concurrency=concurrency, interval=interval, **common)

    @classmethod
    def for_rate(
        cls, rate: float, duration: float = DEFAULT_DURATION, concurrency: int = DEFAULT_IN_FLIGHT_CAP, **common: Any
    ) -> LoadOptions:
        return cls(mode="rate", rate=rate, duration=duration, concurrency=concurrency, **common)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadOptions:
        """Options from parsed arguments; raises :class:`UsageError` for contradictions."""
        open_loop = args.rate is not None or args.duration is not None
        if open_loop and (args.bursts is not None or args.interval is not None):
            raise UsageError(
                "choose one mode: bursts (--bursts, --interval) or open loop (--rate, --duration), not both"
            )
        if args.duration is not None and args.rate is None:
            raise UsageError("--duration needs --rate")
        given = {
            "url": args.url.rstrip("/"),
            "model": args.model,
            "stream": args.stream,
            "timeout": args.timeout,
            "seed": args.seed,
            "json_path": args.json_path,
            "mock_url": args.mock_url.rstrip("/") if args.mock_url else None,
            "concurrency": args.concurrency,
            "api_key": args.api_key or os.environ.get("ORCHESTRATOR_API_KEY"),
        }
        if open_loop:
            given.update(rate=args.rate, duration=args.duration)
        else:
            given.update(bursts=args.bursts, interval=args.interval)
        # Left out, a value takes its mode's default (the seed: a fresh one).
        chosen = {name: value for name, value in given.items() if value is not None}
        return cls.for_rate(**chosen) if open_loop else cls.for_bursts(**chosen)

    @property
    def planned(self) -> int:
        """How many requests the run means to send."""
        if self.mode == "bursts":
            return (self.bursts or 0) * self.concurrency
        return round((self.rate or 0) * (self.duration or 0))

    def parameters(self) -> dict[str, Any]:
        """The report's ``parameters`` object."""
        return {
            "bursts": self.bursts,
            "concurrency": self.concurrency,
            "interval_s": _float(self.interval),
            "rate": _float(self.rate),
            "duration_s": _float(self.duration),
            "model": self.model,
            "stream": float(self.stream),
            "timeout_s": float(self.timeout),
            "seed": self.seed,
        }


def _float(value: float | None) -> float | None:
    # Numbers given as ints in-process are floats in the JSON, as documented.
    return None if value is None else float(value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


# -- requests --------------------------------------------------------------------------


@attrs.frozen
class RequestPlan:
    """What one request sends."""

    index: int
    burst: int | None
    stream: bool
    body: bytes
    request_id: str


class Planner:
    """Plans requests in index order from one generator seeded with ``--seed``, so a seed
    fixes which requests stream and what each one asks, whatever the timing."""

    def __init__(self, options: LoadOptions) -> None:
        self._options = options
        self._rng = random.Random(options.seed)
        self._next_index = 0

    def next(self, burst: int | None) -> RequestPlan:
        rng, options = self._rng, self._options
        index = self._next_index
        self._next_index += 1
        # Always both draws, so one request's choices never shift the next one's.
        stream = rng.random() < options.stream
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
        body: dict[str, Any] = {"model": options.model, "messages": [{"role": "user", "content": prompt}]}
        if stream:
            body["stream"] = True
        return RequestPlan(index, burst, stream, orjson.dumps(body), f"load-{options.seed}-{index}")


@attrs.frozen
class _Head:
    """The status line and the gateway's headers of an answer."""

    status: int
    provider: str | None
    attempts: int | None

    @classmethod
    def of(cls, response: httpx.Response) -> _Head:
        attempts = response.headers.get("x-orchestrator-attempts", "")
        return cls(
            response.status_code,
            response.headers.get("x-orchestrator-provider"),
            int(attempts) if attempts.isdigit() else None,
        )


async def exchange(client: httpx.AsyncClient, plan: RequestPlan, *, timeout: float, origin: float) -> Result:
    """Send one request and read its whole answer; return what became of it.

    Blocks until the answer has been read, the connection failed, or ``timeout`` seconds
    passed. Network failures and the timeout become a ``lost`` result (no status line yet)
    or a ``truncated`` one (the body broke off); they never raise. Cancellation of the
    caller propagates. ``origin`` is the run's start, for ``Result.sent_at``.
    """
    sent_at = trio.current_time()
    head: _Head | None = None
    outcome: Outcome = "lost"
    detail: str | None = "timeout"
    with trio.move_on_after(timeout) as scope:
        try:
            headers = {"x-request-id": plan.request_id, "content-type": "application/json"}
            async with client.stream("POST", CHAT_PATH, content=plan.body, headers=headers) as response:
                head = _Head.of(response)
                outcome, detail = await _read_answer(response)
        except httpx.RequestError as error:
            outcome, detail = ("truncated" if head else "lost"), _reason(error)
    if scope.cancelled_caught:
        outcome, detail = ("truncated" if head else "lost"), "timeout"
    return Result(
        index=plan.index,
        burst=plan.burst,
        stream=plan.stream,
        sent_at=sent_at - origin,
        elapsed=trio.current_time() - sent_at,
        outcome=outcome,
        status=head.status if head else None,
        provider=head.provider if head else None,
        attempts=head.attempts if head else None,
        detail=detail,
    )


async def _read_answer(response: httpx.Response) -> tuple[Outcome, str | None]:
    """Read the body to its end and classify it (see :mod:`orchestrator.loadreport`)."""
    if not response.is_success:
        return "error", _error_type(await response.aread(), response.status_code)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return await _read_events(response)
    try:
        completion = orjson.loads(await response.aread())
    except orjson.JSONDecodeError:
        return "truncated", "invalid_body"
    if not isinstance(completion, dict) or "choices" not in completion:
        return "truncated", "invalid_body"
    return "ok", None


async def _read_events(response: httpx.Response) -> tuple[Outcome, str | None]:
    error: str | None = None
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
        # Most chunks are content: parse only those that may be an error event.
        elif '"error"' in data:
            error = _event_error_type(data) or error
    if error is not None:
        return "stream_error", error
    return ("ok", None) if done else ("truncated", "no_done")


def _error_type(body: bytes, status: int) -> str:
    """An error answer's ``error.code``, else ``error.type``, else ``http_<status>``."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"http_{status}"
    return _type_of(parsed) or f"http_{status}"


def _event_error_type(data: str) -> str | None:
    try:
        return _type_of(orjson.loads(data))
    except orjson.JSONDecodeError:
        return None


def _type_of(parsed: object) -> str | None:
    if not isinstance(parsed, dict) or not isinstance(error := parsed.get("error"), dict):
        return None
    kind = error.get("code") or error.get("type")
    return str(kind) if kind else "unknown"


def _reason(error: httpx.RequestError) -> str:
    """``ConnectError`` -> ``connect_error``: the loss reason in the report."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


# -- progress --------------------------------------------------------------------------


@attrs.define
class Tally:
    """Live counts for the progress display, written only by the sender and the collector."""

    planned: int
    sent: int = 0
    answered: int = 0
    lost: int = 0
    not_sent: int = 0

    @property
    def done(self) -> int:
        return self.answered + self.lost + self.not_sent

    @property
    def in_flight(self) -> int:
        return self.sent - self.answered - self.lost

    def describe(self) -> str:
        text = f"sent {self.sent}, answered {self.answered}, lost {self.lost}, in flight {self.in_flight}"
        return text + (f", not sent {self.not_sent}" if self.not_sent else "")


class View(Protocol):
    """Shows progress. Called from the run's own tasks: ``refresh`` every ``period``
    seconds, ``note`` for lines worth keeping (a burst's summary). Neither may block."""

    period: float

    def start(self, tally: Tally) -> None: ...
    def refresh(self, tally: Tally) -> None: ...
    def note(self, line: str) -> None: ...
    def stop(self, tally: Tally) -> None: ...


class SilentView:
    """No progress at all (the in-process default)."""

    period = math.inf

    def start(self, tally: Tally) -> None:
        pass

    def refresh(self, tally: Tally) -> None:
        pass

    def note(self, line: str) -> None:
        pass

    def stop(self, tally: Tally) -> None:
        pass


class PlainView:
    """A line a second while counts change, and the notes: for logs and pipes."""

    period = 1.0

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._started = 0.0
        self._last = ""

    def start(self, tally: Tally) -> None:
        self._started = trio.current_time()
        self._print(f"load: {tally.planned} requests planned")

    def refresh(self, tally: Tally) -> None:
        text = tally.describe()
        if text != self._last:
            self._last = text
            self._print(f"[{trio.current_time() - self._started:6.1f}s] {text}")

    def note(self, line: str) -> None:
        self._print(line)

    def stop(self, tally: Tally) -> None:
        self.refresh(tally)

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)


class RichView:
    """A live progress bar on a terminal, redrawn by ``refresh`` only (no drawing thread
    competing with the measurement)."""

    period = 0.25

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("load"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[counts]}"),
            console=Console(stderr=True), auto_refresh=False, transient=True,
        )
        self._task = self._progress.add_task("load", total=None, counts="")

    def start(self, tally: Tally) -> None:
        self._progress.update(self._task, total=tally.planned)
        self._progress.start()

    def refresh(self, tally: Tally) -> None:
        self._progress.update(self._task, completed=tally.done, counts=tally.describe())
        self._progress.refresh()

    def note(self, line: str) -> None:
        self._progress.console.print(line, highlight=False)

    def stop(self, tally: Tally) -> None:
        self.refresh(tally)
        self._progress.stop()


# -- the run ---------------------------------------------------------------------------


@attrs.define
class _Collector:
    """Receives results off the hot path: keeps them, counts them, notes finished bursts."""

    options: LoadOptions
    tally: Tally
    view: View
    results: list[Result] = attrs.Factory(list)
    by_burst: defaultdict[int, list[Result]] = attrs.Factory(lambda: defaultdict(list))

    async def collect(self, receive: trio.MemoryReceiveChannel[Result]) -> None:
        """Blocks until every sender has closed its channel."""
        with receive:
            async for result in receive:
                self.record(result)

    def record(self, result: Result) -> None:
        self.results.append(result)
        if result.answered:
            self.tally.answered += 1
        else:
            self.tally.lost += 1
        if result.burst is not None:
            group = self.by_burst[result.burst]
            group.append(result)
            if len(group) == self.options.concurrency:
                self.view.note(_burst_line(result.burst, self.options.bursts or 0, Summary.of(group, primary=None)))


def _burst_line(number: int, bursts: int, summary: Summary) -> str:
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(summary.status.items())) or "-"
    latency = summary.latency
    slowest = "-" if latency.max is None else f"p50 {latency.p50:.1f} ms, max {latency.max:.1f} ms"
    return (
        f"burst {number}/{bursts}: {summary.sent} sent, {summary.answered} answered ({statuses}), "
        f"{summary.lost} lost, {slowest}"
    )


async def run_load(options: LoadOptions, *, view: View | None = None) -> LoadReport:
    """Run the load described by ``options`` and return its report.

    Blocks for the whole run: until every request has been answered, lost or timed out.
    Cancelling it cancels every request in flight. Raises :class:`LoadError` when the
    mock's ``/stats`` (with ``mock_url``) cannot be read.
    """
    view = SilentView() if view is None else view
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    async with _open_client(options) as client:
        primary = await discover_primary(client, options.model)
        before = await read_mock_stats(client, options.mock_url) if options.mock_url else None
        tally = Tally(options.planned)
        collector = _Collector(options, tally, view)
        view.start(tally)
        try:
            schedule = await _drive(client, options, collector)
        finally:
            view.stop(tally)
        after = await read_mock_stats(client, options.mock_url) if options.mock_url else None

    results = sorted(collector.results, key=lambda result: result.index)
    total = Summary.of(results, primary=primary)
    bursts = tuple(
        Summary.of(collector.by_burst[number], primary=primary) for number in range(1, (options.bursts or 0) + 1)
    )
    upstream = None
    if options.mock_url and before is not None and after is not None:
        try:
            upstream = Upstream.between(
                before, after, mock_url=options.mock_url, sent=total.sent, header_attempts=total.attempts.total
            )
        except ValueError as error:
            raise LoadError(str(error)) from None
    return LoadReport(
        gateway=options.url,
        mode=options.mode,
        parameters=options.parameters(),
        started_at=started_at,
        primary_provider=primary,
        total=total,
        bursts=bursts,
        schedule=schedule,
        upstream=upstream,
    )


async def _drive(client: httpx.AsyncClient, options: LoadOptions, collector: _Collector) -> Schedule | None:
    """Send every request and collect every result; the view refreshes meanwhile."""
    send, receive = trio.open_memory_channel[Result](options.concurrency)
    async with trio.open_nursery() as outer:
        outer.start_soon(_refresh, collector.view, collector.tally)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.collect, receive)
            with send:
                sender = _Sender(client, options, Planner(options), send, collector.tally, trio.current_time())
                schedule = await (sender.bursts() if options.mode == "bursts" else sender.open_loop())
        outer.cancel_scope.cancel()
    return schedule


async def _refresh(view: View, tally: Tally) -> None:
    """Redraw the view every ``view.period`` seconds until cancelled."""
    while True:
        await trio.sleep(view.period)
        view.refresh(tally)


@attrs.frozen
class _Sender:
    client: httpx.AsyncClient
    options: LoadOptions
    planner: Planner
    results: trio.MemorySendChannel[Result]
    tally: Tally
    origin: float

    async def bursts(self) -> None:
        """Fire the bursts; blocks until the last request of the last burst is done."""
        assert self.options.bursts is not None and self.options.interval is not None
        for number in range(1, self.options.bursts + 1):
            if number > 1:
                await trio.sleep(self.options.interval)
            async with trio.open_nursery() as nursery:
                for _ in range(self.options.concurrency):
                    self.tally.sent += 1
                    nursery.start_soon(self._one, self.planner.next(number))

    async def open_loop(self) -> Schedule:
        """Start requests on the schedule; blocks until the last one sent is done.

        The schedule never waits for answers: a request due while ``concurrency``
        requests are in flight is dropped (counted), so nothing queues up unbounded.
        """
        assert self.options.rate is not None
        rate = self.options.rate
        limiter = trio.CapacityLimiter(self.options.concurrency)
        lags: list[float] = []
        not_sent = 0
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for index in range(self.options.planned):
                due = start + index / rate
                await trio.sleep_until(due)
                plan = self.planner.next(None)
                try:
                    limiter.acquire_on_behalf_of_nowait(plan.index)
                except trio.WouldBlock:
                    not_sent += 1
                    self.tally.not_sent += 1
                    continue
                lags.append(trio.current_time() - due)
                self.tally.sent += 1
                nursery.start_soon(self._one_limited, plan, limiter)
        return Schedule(
            rate=rate,
            planned=self.options.planned,
            sent=len(lags),
            not_sent=not_sent,
            late=sum(lag > 1 / rate for lag in lags),
            lag=Percentiles.of_seconds(lags),
        )

    async def _one_limited(self, plan: RequestPlan, limiter: trio.CapacityLimiter) -> None:
        try:
            await self._one(plan)
        finally:
            limiter.release_on_behalf_of(plan.index)

    async def _one(self, plan: RequestPlan) -> None:
        result = await exchange(self.client, plan, timeout=self.options.timeout, origin=self.origin)
        await self.results.send(result)


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several small keep-alive pools behind one transport, used in turn."""

    def __init__(self, connections: int, *, per_pool: int = CONNECTIONS_PER_POOL) -> None:
        sizes = [min(per_pool, connections - start) for start in range(0, connections, per_pool)]
        self._pools = [
            httpx.AsyncHTTPTransport(
                retries=0,
                trust_env=False,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size,
                                    keepalive_expiry=KEEPALIVE_EXPIRY),
            )
            for size in sizes
        ]
        self._next = itertools.cycle(self._pools).__next__

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._next().handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def _open_client(options: LoadOptions) -> httpx.AsyncClient:
    """The one client of the run: keep-alive connections for the whole concurrency in
    small pools, no retries (each failure is a result to report), no proxies from the
    environment, and no httpx timeouts (``exchange`` bounds each request with a trio
    scope)."""
    transport = ShardedTransport(options.concurrency)
    headers = {"authorization": f"Bearer {options.api_key}"} if options.api_key else None
    return httpx.AsyncClient(
        base_url=options.url, transport=transport, timeout=None, trust_env=False, headers=headers
    )


async def discover_primary(client: httpx.AsyncClient, model: str) -> str | None:
    """The first deployment's provider for ``model``, from the gateway's ``GET /v1/models``
    (exact routes first, then patterns, as the gateway matches). None when the gateway
    does not say; a failure here is not an error (the run reports the failure itself)."""
    with trio.move_on_after(SIDE_REQUEST_TIMEOUT):
        try:
            response = await client.get("/v1/models")
            routes = response.json()["data"] if response.is_success else []
        except (httpx.RequestError, ValueError, KeyError, TypeError):
            return None
        return primary_for(routes, model)
    return None


def primary_for(routes: list[Any], model: str) -> str | None:
    """The first provider of the first route matching ``model`` in ``/v1/models`` data."""
    entries = [route for route in routes if isinstance(route, dict) and route.get("providers")]
    exact = [route for route in entries if route.get("id") == model]
    patterns = [route for route in entries if route.get("pattern") and fnmatch.fnmatchcase(model, str(route["id"]))]
    matches = exact + patterns
    return str(matches[0]["providers"][0]) if matches else None


async def read_mock_stats(client: httpx.AsyncClient, mock_url: str) -> Mapping[str, Any]:
    """The mock's ``GET /stats`` body. Raises :class:`LoadError` if it cannot be read."""
    with trio.move_on_after(SIDE_REQUEST_TIMEOUT):
        try:
            response = await client.get(f"{mock_url}/stats")
            response.raise_for_status()
            stats = response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise LoadError(f"cannot read {mock_url}/stats: {error}") from None
        if not isinstance(stats, dict):
            raise LoadError(f"{mock_url}/stats is not a JSON object")
        return stats
    raise LoadError(f"{mock_url}/stats did not answer within {SIDE_REQUEST_TIMEOUT:g} s")


# -- command line ----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``orchestrator load``: run, print the report, write the JSON; the exit status."""
    try:
        options = LoadOptions.from_args(args)
    except UsageError as error:
        print(f"orchestrator load: {error}", file=sys.stderr)
        return 2
    json_to_stdout = options.json_path == "-"
    view: View = RichView() if sys.stderr.isatty() and not json_to_stdout else PlainView(sys.stderr)
    report: LoadReport | None = None
    failure: str | None = None
    try:
        report = trio.run(partial(run_load, options, view=view))
    except* KeyboardInterrupt:
        failure = "interrupted"
    except* LoadError as group:
        failure = "; ".join(str(error) for error in group.exceptions)
    if report is None:
        print(f"orchestrator load: no report: {failure}", file=sys.stderr)
        return 130 if failure == "interrupted" else 3
    print(report.render(), file=sys.stderr if json_to_stdout else sys.stdout, flush=True)
    if options.json_path:
        try:
            _write_json(report, options.json_path)
        except OSError as error:
            print(f"orchestrator load: cannot write {options.json_path}: {error.strerror}", file=sys.stderr)
            return 3
    return report.exit_status


def _write_json(report: LoadReport, path: str) -> None:
    data = orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n"
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    with open(path, "wb") as file:
        file.write(data)
