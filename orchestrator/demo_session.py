"""What the demo runner stands on: its values, the servers' HTTP APIs, the narration.

:class:`Session` talks to the mock (``POST /config/failures``, ``GET /stats``,
``POST /stats/reset``) and to the gateway (``POST /v1/chat/completions`` as curl sends
it, ``GET /health``), and prints through a :class:`Narrator`. When the gateway runs in
this process, a :class:`Journal` holds its journey log records, so the narration can
show the very lines the guide says to point out.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import httpx
import orjson
import trio
from rich.console import Console
from rich.text import Text

from orchestrator.logs import TextFormatter

__all__ = [
    "CHAT_PATH",
    "CURL_FORM",
    "POLL_INTERVAL",
    "SEED_CHAT",
    "Check",
    "Exchange",
    "Journal",
    "MockStats",
    "Narrator",
    "ProviderHealth",
    "ScenarioResult",
    "Session",
    "Setup",
    "duration",
    "event_name",
    "recording_journeys",
]

#: The seed's request, byte for byte as its cheat sheet sends it.
SEED_CHAT = b'{"model":"gpt-4","messages":[{"role":"user","content":"test"}]}'
#: What ``curl -d`` sends as the content type; both servers must read it as JSON.
CURL_FORM = {"content-type": "application/x-www-form-urlencoded"}
CHAT_PATH = "/v1/chat/completions"
#: Both personalities back to a healthy profile (``{}`` for each).
RESET_ALL = {"provider": "all"}
#: How often the mock's /stats is read to date attempts from outside.
POLL_INTERVAL = 0.01
#: Extra wait past what /health says is left (it rounds to the millisecond).
SETTLE_MARGIN = 0.01
#: Journey records kept by a Journal (a demo run logs a few dozen).
JOURNAL_CAPACITY = 10_000
#: Journey events of the router's waits; each has a ``wait_seconds`` field.
WAIT_EVENTS = ("backoff", "rate_limit_wait")
#: The loggers whose records make up a request's journey (the router's, the actors').
JOURNEY_LOGGERS = ("orchestrator.journey", "orchestrator.provider")


# -- values ------------------------------------------------------------------------------


@attrs.frozen
class Check:
    """One thing a scenario must show: the claim, what was observed, and whether it held."""

    passed: bool
    claim: str
    observed: str


@attrs.frozen
class ScenarioResult:
    number: int
    title: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)


@attrs.frozen
class Setup:
    """Where the servers are and what this run knows about them.

    ``max_attempts`` and ``failure_threshold`` are the gateway's retry and breaker
    settings: read from its configuration when the demo started it, else the defaults
    (``configured`` False says they are assumed).
    """

    mock_url: str
    gateway_url: str
    stall_seconds: float
    mock_seed: int | None
    max_attempts: int
    failure_threshold: int
    configured: bool


@attrs.frozen
class Exchange:
    """One request to the gateway and its answer, as the client saw it."""

    status: int
    request_id: str
    provider: str
    attempts: int
    seconds: float
    body: Any

    @classmethod
    def from_response(cls, response: httpx.Response, seconds: float) -> Exchange:
        headers = response.headers
        try:
            body = response.json()
        except ValueError:
            body = None
        return cls(
            status=response.status_code,
            request_id=headers.get("x-request-id", "?"),
            provider=headers.get("x-orchestrator-provider", "?"),
            attempts=int(headers.get("x-orchestrator-attempts", "0")),
            seconds=seconds,
            body=body,
        )

    @property
    def answer(self) -> str:
        try:
            return str(self.body["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            return ""

    @property
    def error(self) -> Mapping[str, Any]:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return error if isinstance(error, dict) else {}

    def field(self, name: str) -> Any:
        return self.body.get(name) if isinstance(self.body, dict) else None

    def summary(self) -> str:
        plural = "" if self.attempts == 1 else "s"
        return (f"{self.status} from {self.provider}, {self.attempts} attempt{plural},"
                f" {duration(self.seconds)} (x-request-id {self.request_id})")


@attrs.frozen
class PersonalityStats:
    requests: int
    outcomes: Mapping[str, int]

    def count(self, outcome: str) -> int:
        return self.outcomes.get(outcome, 0)

    def describe(self) -> str:
        counted = ", ".join(f"{kind} {count}" for kind, count in self.outcomes.items() if count)
        plural = "" if self.requests == 1 else "s"
        return f"{self.requests} request{plural}" + (f" ({counted})" if counted else "")


@attrs.frozen
class MockStats:
    openai: PersonalityStats
    anthropic: PersonalityStats

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MockStats:
        return cls(*(PersonalityStats(data[name]["requests"], dict(data[name]["outcomes"]))
                     for name in ("openai", "anthropic")))

    def describe(self) -> str:
        return f"openai {self.openai.describe()}; anthropic {self.anthropic.describe()}"


@attrs.frozen
class ProviderHealth:
    circuit: str
    consecutive_failures: int
    open_for: float | None
    rate_limited_for: float | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProviderHealth:
        return cls(data["circuit"], data["consecutive_failures"], data["open_for_seconds"],
                   data["rate_limited_for_seconds"])

    def describe(self) -> str:
        text = f"circuit {self.circuit}, {self.consecutive_failures} consecutive failures"
        if self.open_for is not None:
            text += f", open for {self.open_for:.1f} s more"
        if self.rate_limited_for is not None:
            text += f", rate limited for {self.rate_limited_for:.1f} s more"
        return text


# -- the gateway's journey log, captured in-process --------------------------------------


class Journal(logging.Handler):
    """The gateway's journey log records, kept in memory (the newest JOURNAL_CAPACITY).

    Only meaningful when the gateway runs in this process; ``emit`` runs in the trio
    thread that logs, so reading between checkpoints sees every record so far.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._records: deque[logging.LogRecord] = deque(maxlen=JOURNAL_CAPACITY)
        self._text = TextFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)

    def journey(self, *request_ids: str) -> list[logging.LogRecord]:
        """The records of these requests, in the order they were logged."""
        wanted = set(request_ids)
        return [record for record in self._records if getattr(record, "request_id", None) in wanted]

    def lines(self, records: list[logging.LogRecord]) -> list[str]:
        return [self._text.format(record) for record in records]

    def waits(self, request_id: str) -> tuple[float, ...]:
        """The waits the router chose for this request (backoff, rate limit), in order."""
        return tuple(record.fields["wait_seconds"] for record in self.journey(request_id)  # type: ignore[attr-defined]
                     if event_name(record) in WAIT_EVENTS)

    def events(self, name: str, *request_ids: str) -> list[logging.LogRecord]:
        return [record for record in self.journey(*request_ids) if event_name(record) == name]


def event_name(record: logging.LogRecord) -> str | None:
    return getattr(record, "event", None)


@contextmanager
def recording_journeys() -> Iterator[Journal]:
    """Send the gateway's journey records to a new Journal for the block's duration.

    They stop propagating meanwhile: the demo prints the ones that matter where they
    matter. Every other logger (server errors included) is left alone.
    """
    journal = Journal()
    loggers = [logging.getLogger(name) for name in JOURNEY_LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(journal)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield journal
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(journal)
            logger.setLevel(level)
            logger.propagate = propagate


# -- output --------------------------------------------------------------------------------


class Narrator:
    """Prints the demo: colour on a terminal, plain text otherwise (rich decides)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def heading(self, text: str) -> None:
        self.console.print()
        self.console.print(Text(text, style="bold"))

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(Text(f"  {text}", style=style or ""))

    def command(self, text: str) -> None:
        self.console.print(Text(f"  $ {text}", style="cyan"))

    def log(self, title: str, lines: list[str]) -> None:
        self.say(title)
        for line in lines:
            self.console.print(Text(f"    {line}", style="dim"))

    def talking_point(self, text: str) -> None:
        self.console.print(Text(f'  > "{text}"', style="italic"))

    def verdict(self, result: ScenarioResult) -> None:
        word, style = ("PASS", "bold green") if result.passed else ("FAIL", "bold red")
        self.console.print(Text(f"{word}  scenario {result.number}: {result.title}", style=style))
        for check in result.checks:
            mark = "ok  " if check.passed else "FAIL"
            style = "" if check.passed else "red"
            self.console.print(Text(f"    {mark} {check.claim}: {check.observed}", style=style))


# -- talking to the servers ----------------------------------------------------------------


class Session:
    """The servers of one demo run, the client that talks to them, and the narrator.

    Every method blocks on HTTP round trips; none has a timeout of its own (the client's
    applies). Cancelling the caller abandons the request in flight.
    """

    def __init__(self, setup: Setup, client: httpx.AsyncClient, out: Narrator, journal: Journal | None) -> None:
        self.setup = setup
        self.client = client
        self.out = out
        self.journal = journal

    # -- the mock --

    async def configure_mock(self, profile: Mapping[str, Any]) -> None:
        """POST ``profile`` to the mock's /config/failures, showing the curl command."""
        body = orjson.dumps(profile)
        self.out.command(f"curl -X POST {self.setup.mock_url}/config/failures -d '{body.decode()}'")
        await self._post_mock("/config/failures", body)

    async def mock_stats(self) -> MockStats:
        response = await self.client.get(f"{self.setup.mock_url}/stats")
        response.raise_for_status()
        return MockStats.from_json(response.json())

    async def reset(self, *, settle_openai: bool) -> None:
        """Make both personalities healthy, zero the counts, and with ``settle_openai``
        bring the gateway's openai back to a closed circuit with no failures on record.

        Settling blocks while openai is still open or rate limited from an earlier
        scenario (or an earlier run against the same gateway), then sends one request.
        """
        await self._post_mock("/config/failures", orjson.dumps(RESET_ALL))
        if settle_openai:
            await self._settle_openai()
        await self._post_mock("/stats/reset", b"")

    async def _settle_openai(self) -> None:
        openai = (await self.health()).get("openai")
        if openai is None:
            return
        wait = max(openai.open_for or 0.0, openai.rate_limited_for or 0.0)
        if wait > 0:
            blocked = [f"circuit open for {openai.open_for:.1f} s more"] if openai.open_for else []
            if openai.rate_limited_for:
                blocked.append(f"rate limited for {openai.rate_limited_for:.1f} s more")
            self.out.say(f"(openai is still {' and '.join(blocked)}: waiting for that to clear)", "dim")
            await trio.sleep(wait + SETTLE_MARGIN)
            openai = (await self.health())["openai"]
        if openai.circuit == "half_open" or openai.consecutive_failures:
            # One success on the healthy mock closes a half-open circuit (it is the probe)
            # and clears the failures on record: the scenario starts from a clean slate.
            self.out.say(f"(openai: {openai.describe()}; one request on the healthy mock clears that)", "dim")
            await self.send_chat(SEED_CHAT)

    async def _post_mock(self, path: str, body: bytes) -> None:
        response = await self.client.post(f"{self.setup.mock_url}{path}", content=body, headers=CURL_FORM)
        response.raise_for_status()

    # -- the gateway --

    async def health(self) -> dict[str, ProviderHealth]:
        response = await self.client.get(f"{self.setup.gateway_url}/health")
        response.raise_for_status()
        return {name: ProviderHealth.from_json(data) for name, data in response.json()["providers"].items()}

    def chat_command(self, body: bytes) -> str:
        return f"curl -X POST {self.setup.gateway_url}{CHAT_PATH} -d '{body.decode()}'"

    async def send_chat(self, body: bytes) -> Exchange:
        """POST ``body`` as curl would; blocks for the request's whole journey."""
        start = trio.current_time()
        response = await self.client.post(f"{self.setup.gateway_url}{CHAT_PATH}", content=body, headers=CURL_FORM)
        return Exchange.from_response(response, trio.current_time() - start)

    async def send_chat_dating_attempts(self, body: bytes) -> tuple[Exchange, tuple[float, ...]]:
        """``send_chat``, while polling the mock's /stats to date openai's attempts.

        Returns the exchange and, per openai request the mock received, when this client
        first saw it counted (``trio.current_time()``; late by at most one poll and one
        round trip). Requests still uncounted when the answer arrives are dated then.
        """
        samples: list[tuple[float, int]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_openai_requests, samples)
            exchange = await self.send_chat(body)
            answered = trio.current_time()
            nursery.cancel_scope.cancel()
        samples.append((answered, (await self.mock_stats()).openai.requests))
        return exchange, _arrivals(samples)

    async def _poll_openai_requests(self, samples: list[tuple[float, int]]) -> None:
        """Append (time, openai requests) every POLL_INTERVAL until cancelled."""
        while True:
            stats = await self.mock_stats()
            samples.append((trio.current_time(), stats.openai.requests))
            await trio.sleep(POLL_INTERVAL)

    # -- showing the evidence --

    def show_journey(self, *request_ids: str, title: str = "gateway log") -> list[logging.LogRecord]:
        """Print these requests' journey lines (or where to find them); return the records."""
        if self.journal is None:
            ids = ", ".join(request_ids)
            self.out.say(f"{title}: in the gateway's terminal, the lines tagged [{ids}]", "dim")
            return []
        records = self.journal.journey(*request_ids)
        self.out.log(f"{title}:", self.journal.lines(records))
        return records


def _arrivals(samples: list[tuple[float, int]]) -> tuple[float, ...]:
    """When each counted request was first seen, from (time, running count) samples."""
    arrivals: list[float] = []
    for when, count in samples:
        arrivals.extend([when] * (count - len(arrivals)))
    return tuple(arrivals)


def duration(seconds: float) -> str:
    """``4.1 ms`` below a second, ``2.38 s`` above."""
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
