"""The seed's five demo scenarios, each run against live servers, narrated and judged.

A scenario configures the mock over its HTTP API with the seed's own body, sends the
seed's request to the gateway, narrates what happened the way the demo guide's talking
points do, and returns its :class:`Check` values, each with what was observed.

Where the evidence comes from:

- what any client sees: the status, ``x-request-id``, ``x-orchestrator-provider`` and
  ``x-orchestrator-attempts``, and the round trip timed by this client;
- the gateway's ``GET /health`` (each provider's circuit and rate limit);
- the mock's ``GET /stats`` (what reached each personality, and how it answered);
- with a :class:`Journal` (the demo started the gateway in this process): the gateway's
  own journey log records -- the lines to point out, and the backoff waits exactly as the
  router chose them. Without one, scenario 2's waits are measured from outside: the
  mock's ``/stats`` is polled while the request runs, which dates each attempt's arrival
  at the mock, and a wait is the gap between two arrivals minus the mock's stall.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import trio

from orchestrator.exceptiongroups import leaves
from orchestrator.demo_session import (
    POLL_INTERVAL,
    SEED_CHAT,
    Check,
    Exchange,
    MockStats,
    ScenarioResult,
    Session,
    duration,
    event_name,
)

__all__ = ["GUIDE_SEED", "SCENARIOS", "Scenario", "run_scenario"]

#: Scenario 5's invalid request (empty messages).
EMPTY_MESSAGES = b'{"model":"gpt-4","messages":[]}'
#: The mock's default ``retry_after_seconds``: what scenario 3's 429s ask the client to wait.
MOCK_RETRY_AFTER = 1.0
#: Scenario 4's burst, as in the seed's ``for i in {1..7}`` loop.
BURST = 7
#: The seed's "instant error" bound for scenario 5, and how often its request is sent.
INSTANT = 0.010
VALIDATION_TRIES = 5
#: Under this mock seed scenario 2 goes as the guide tells it: timeout, timeout, success.
GUIDE_SEED = 1


# -- the scenarios -------------------------------------------------------------------------


@attrs.frozen
class Scenario:
    number: int
    title: str
    goal: str
    play: Callable[[Session], Awaitable[tuple[Check, ...]]]
    #: The scenario's story starts from a healthy openai (closed circuit, no rate limit).
    needs_healthy_openai: bool = True


async def run_scenario(session: Session, scenario: Scenario) -> ScenarioResult:
    """Reset the servers, play ``scenario``, print and return its verdict.

    An HTTP failure (a server gone, say) fails the scenario rather than the run.
    """
    session.out.heading(f"Scenario {scenario.number}: {scenario.title}")
    session.out.say(f"Goal: {scenario.goal}")
    try:
        await session.reset(settle_openai=scenario.needs_healthy_openai)
        checks = await scenario.play(session)
    except* httpx.HTTPError as group:  # from a nursery (the burst) it comes in a group
        checks = tuple(Check(False, "the servers answered", f"{type(error).__name__}: {error}")
                       for error in leaves(group))
    result = ScenarioResult(scenario.number, scenario.title, checks)
    session.out.verdict(result)
    return result


async def normal_success(s: Session) -> tuple[Check, ...]:
    await s.configure_mock({})
    s.out.command(s.chat_command(SEED_CHAT))
    exchange = await s.send_chat(SEED_CHAT)
    stats = await s.mock_stats()
    s.out.say(f"-> {exchange.summary()}")
    records = s.show_journey(exchange.request_id)
    s.out.say(f"mock /stats: {stats.describe()}")
    s.out.talking_point(
        f"Normal flow: validation passes, one attempt, success in {duration(exchange.seconds)}."
        f" Notice the request_id {exchange.request_id} tracks everything."
    )
    return (
        Check(exchange.status == 200 and exchange.provider == "openai" and exchange.attempts == 1,
              "answered 200 by openai in one attempt", exchange.summary()),
        Check(exchange.field("object") == "chat.completion" and bool(exchange.answer),
              "an OpenAI chat.completion with an answer",
              f"object {exchange.field('object')}, {len(exchange.answer.split())} words"),
        Check(stats.openai.requests == stats.openai.count("ok") == 1 and stats.anthropic.requests == 0,
              "one call, to openai, answered", f"mock /stats: {stats.describe()}"),
        _request_id_check(s, exchange, records),
    )


def _request_id_check(s: Session, exchange: Exchange, records: list[logging.LogRecord]) -> Check:
    if s.journal is None:
        return Check(exchange.request_id.startswith("req_"), "the request carries an id",
                     f"x-request-id {exchange.request_id}")
    events = [event_name(record) for record in records]
    return Check(events == ["accepted", "attempt", "done"], "one request id tracks the journey",
                 f"{exchange.request_id} on {len(records)} log lines: {', '.join(map(str, events))}")


async def timeout_retry(s: Session) -> tuple[Check, ...]:
    stall = s.setup.stall_seconds
    profile: dict[str, Any] = {"timeout_probability": 0.7, "timeout_duration_seconds": stall}
    if s.setup.mock_seed is not None:
        profile["seed"] = s.setup.mock_seed
    await s.configure_mock(profile)
    s.out.say(f"70% of openai's answers now stall {_seconds(stall)} and end in a 504 (a timeout).")
    s.out.command(s.chat_command(SEED_CHAT))
    if s.journal is not None:
        exchange = await s.send_chat(SEED_CHAT)
        waits = s.journal.waits(exchange.request_id)
        source = "as the gateway logged them"
    else:
        exchange, arrivals = await s.send_chat_dating_attempts(SEED_CHAT)
        waits = tuple(later - earlier - stall for earlier, later in zip(arrivals, arrivals[1:]))
        source = (f"measured from outside: the gaps between openai's attempts on the mock's /stats"
                  f" (read every {POLL_INTERVAL * 1000:.0f} ms) minus the {_seconds(stall)} stall")
    stats = await s.mock_stats()
    s.out.say(f"-> {exchange.summary()}")
    s.show_journey(exchange.request_id)
    s.out.say(f"mock /stats: {stats.describe()}")
    s.out.say(f"backoff waits ({source}): {_waits_text(waits) or 'none'}")
    outcome = _TimeoutOutcome(stats, s.setup.max_attempts)
    s.out.talking_point(outcome.talking_point(waits))
    checks = [
        Check(exchange.status == 200, "the client gets its answer", exchange.summary()),
        Check(outcome.legitimate(exchange), "every timeout was retried; failover only after the last",
              outcome.path()),
        Check(len(waits) == outcome.retries, "a backoff wait before every retry",
              f"{len(waits)} wait{'s' if len(waits) != 1 else ''} for {outcome.retries}"
              f" retr{'ies' if outcome.retries != 1 else 'y'}"),
        Check(all(later > earlier for earlier, later in zip(waits, waits[1:])), "the waits grow",
              _waits_text(waits) or "no retry, no wait"),
        Check(exchange.attempts == stats.openai.requests + stats.anthropic.requests,
              "x-orchestrator-attempts counts every attempt",
              f"header {exchange.attempts}, calls the mock received"
              f" {stats.openai.requests + stats.anthropic.requests}"),
    ]
    if s.journal is not None:
        # Logged waits could be mere words: the request's duration shows they were spent.
        spent = outcome.timeouts * stall + sum(waits)
        checks.append(Check(exchange.seconds >= spent, "the gateway really waited",
                            f"{exchange.seconds:.2f} s >= {outcome.timeouts} stall(s) of {_seconds(stall)}"
                            f" + waits {sum(waits):.2f} s"))
    if outcome.timeouts == 0:
        s.out.say(f"(for the guide's exact sequence, timeout, timeout, success: --seed {GUIDE_SEED})", "dim")
    return tuple(checks)


@attrs.frozen
class _TimeoutOutcome:
    """What the mock's counts say happened in scenario 2, and whether it is allowed."""

    stats: MockStats
    max_attempts: int

    @property
    def timeouts(self) -> int:
        return self.stats.openai.count("timeout")

    @property
    def succeeded_on_openai(self) -> bool:
        return self.stats.openai.count("ok") == 1

    @property
    def retries(self) -> int:
        return max(self.stats.openai.requests - 1, 0)

    def legitimate(self, exchange: Exchange) -> bool:
        """Success on openai before its attempts ran out, or failover after all of them."""
        openai, anthropic = self.stats.openai, self.stats.anthropic
        if openai.requests != self.timeouts + openai.count("ok"):
            return False  # some other fault: not this scenario's
        if self.succeeded_on_openai:
            return exchange.provider == "openai" and anthropic.requests == 0 and self.timeouts < self.max_attempts
        return (exchange.provider == "anthropic" and self.timeouts == self.max_attempts
                and anthropic.requests == anthropic.count("ok") == 1)

    def path(self) -> str:
        steps = ["timeout"] * self.timeouts + (["ok"] if self.succeeded_on_openai else [])
        text = "openai: " + " -> ".join(steps or ["no attempt"])
        if self.stats.anthropic.requests:
            text += f", failover -> anthropic: {self.stats.anthropic.describe()}"
        return text

    def talking_point(self, waits: tuple[float, ...]) -> str:
        if self.timeouts == 0:
            return ("No timeout this time: the 30% chance of a healthy answer came up first."
                    " One attempt, success.")
        backoff = f"System retries with exponential backoff: {_waits_text(waits, ', then ')}."
        if self.succeeded_on_openai:
            return (f"Provider times out. {backoff} Prevents overwhelming a struggling provider."
                    f" Eventually succeeds, on attempt {self.timeouts + 1}.")
        return (f"Provider times out {self.timeouts} times. {backoff} Then it stops hammering it and"
                " fails over to Anthropic, which answers. The client still gets its 200.")


async def rate_limit_failover(s: Session) -> tuple[Check, ...]:
    await s.configure_mock({"rate_limit_probability": 1.0})
    s.out.command(s.chat_command(SEED_CHAT))
    exchange = await s.send_chat(SEED_CHAT)
    stats = await s.mock_stats()
    s.out.say(f"-> {exchange.summary()}")
    s.show_journey(exchange.request_id)
    s.out.say(f"mock /stats: {stats.describe()}")
    s.out.talking_point(
        f"Hit rate limit on OpenAI. Instead of waiting (its Retry-After said {_seconds(MOCK_RETRY_AFTER)}),"
        f" immediately fails over to Anthropic: answered in {duration(exchange.seconds)}."
        " Fast recovery, transparent to user."
    )
    waited = s.journal.waits(exchange.request_id) if s.journal is not None else ()
    return (
        Check(exchange.status == 200 and exchange.provider == "anthropic" and exchange.attempts == 2,
              "answered 200 by anthropic on attempt 2", exchange.summary()),
        Check(stats.openai.requests == stats.openai.count("rate_limit") == 1
              and stats.anthropic.requests == stats.anthropic.count("ok") == 1,
              "openai said 429 once, anthropic answered", f"mock /stats: {stats.describe()}"),
        Check(exchange.seconds < MOCK_RETRY_AFTER and not waited, "failed over at once, no waiting",
              f"answered in {duration(exchange.seconds)}, Retry-After was {_seconds(MOCK_RETRY_AFTER)}"),
        Check(exchange.field("object") == "chat.completion" and bool(exchange.answer),
              "transparent to the client: an OpenAI chat.completion",
              f"object {exchange.field('object')}, model {exchange.field('model')}"),
    )


async def circuit_breaker(s: Session) -> tuple[Check, ...]:
    await s.configure_mock({"server_error_probability": 1.0})
    s.out.command(f"for i in {{1..{BURST}}}; do {s.chat_command(SEED_CHAT)} & done; wait")
    burst = await _send_burst(s, SEED_CHAT, BURST)
    health = await s.health()
    stats = await s.mock_stats()
    outcomes = Counter(f"{exchange.status} from {exchange.provider}" for exchange in burst)
    s.out.say(f"-> {_counted(outcomes)}")
    openai = health["openai"]
    s.out.say(f"gateway /health: openai {openai.describe()}")
    s.out.say(f"mock /stats: {stats.describe()}")
    skips = _show_burst_log(s, burst)
    s.out.say("one more request, now that the circuit is open:")
    s.out.command(s.chat_command(SEED_CHAT))
    follow_up = await s.send_chat(SEED_CHAT)
    after = await s.mock_stats()
    s.out.say(f"-> {follow_up.summary()}")
    s.show_journey(follow_up.request_id)
    threshold, allowed = s.setup.failure_threshold, s.setup.max_attempts
    reached = stats.openai.requests
    # Every answer came from anthropic, so each request's other attempts were openai calls.
    openai_calls = sorted(exchange.attempts - 1 for exchange in burst)
    s.out.talking_point(
        f"After {threshold} failures, circuit breaker opens. Subsequent requests don't even try OpenAI -"
        " they immediately use Anthropic. This prevents wasting time on a dead provider."
    )
    skipped = f"; the log shows {skips} skips" if skips is not None else ""
    s.out.say(f"(the {BURST} requests run concurrently, so their first attempts were in flight together."
              f" Without the breaker each would have tried openai {allowed} times, {BURST * allowed} calls;"
              f" it got {reached}{skipped})", "dim")
    return (
        Check(outcomes == Counter({"200 from anthropic": BURST}), f"all {BURST} answered 200 by anthropic",
              _counted(outcomes)),
        Check(openai.circuit == "open", "the circuit for openai opened", f"/health: openai {openai.describe()}"),
        Check(reached >= threshold and stats.openai.count("server_error") == reached == sum(openai_calls),
              f"openai failed at least {threshold} times, every call accounted for",
              f"mock /stats: openai {stats.openai.describe()};"
              f" the answers' x-orchestrator-attempts count {sum(openai_calls)} openai calls"),
        Check(max(openai_calls) < allowed, "the breaker cut the retries short",
              f"openai calls per request {openai_calls}, of the {allowed} allowed"),
        # Strictly after the open (seen in /health): the one unambiguous test that an
        # open circuit lets nothing through.
        Check(follow_up.status == 200 and follow_up.provider == "anthropic" and follow_up.attempts == 1
              and after.openai.requests == reached,
              "once open, openai gets nothing: a follow-up goes straight to anthropic",
              f"{follow_up.summary()}; openai calls still {after.openai.requests}"),
    )


async def _send_burst(s: Session, body: bytes, count: int) -> list[Exchange]:
    """``count`` concurrent requests; returns their exchanges in the order they finished."""
    finished: list[Exchange] = []

    async def one() -> None:
        finished.append(await s.send_chat(body))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return finished


def _show_burst_log(s: Session, burst: list[Exchange]) -> int | None:
    """Show the journey of the request whose failure opened the circuit; count the skips."""
    if s.journal is None:
        s.show_journey(*(exchange.request_id for exchange in burst))
        return None
    ids = [exchange.request_id for exchange in burst]
    opened = s.journal.events("circuit", *ids)
    shown = opened[0].request_id if opened else ids[0]  # type: ignore[attr-defined]
    s.show_journey(shown, title=f"gateway log (1 of the {len(burst)}: the one whose failure opened the circuit)")
    return len(s.journal.events("skip", *ids))


async def validation(s: Session) -> tuple[Check, ...]:
    s.out.command(s.chat_command(EMPTY_MESSAGES))
    # Sent a few times: "instant" is the gateway's property, and one round trip on a busy
    # machine can wait out another process's time slice. The fastest is what it can do.
    exchanges = [await s.send_chat(EMPTY_MESSAGES) for _ in range(VALIDATION_TRIES)]
    stats = await s.mock_stats()
    first = exchanges[0]
    error = first.error
    s.out.say(f"-> {first.summary()}")
    s.out.say(f"   error: {error.get('message')} (param {error.get('param')})")
    records = s.show_journey(first.request_id)
    inside = [record.fields["elapsed_ms"] for record in records  # type: ignore[attr-defined]
              if event_name(record) == "done"]
    s.out.say(f"mock /stats: {stats.describe()}")
    fastest = min(exchange.seconds for exchange in exchanges)
    s.out.talking_point(
        f"Invalid requests fail instantly ({duration(fastest)} round trip)."
        " Saves API costs and gives immediate feedback."
    )
    timing = (f"fastest of {len(exchanges)} round trips {duration(fastest)}"
              f" ({', '.join(duration(exchange.seconds) for exchange in exchanges)}),"
              " from this client over loopback, HTTP included")
    if inside:
        timing += f"; {inside[0]:.1f} ms inside the gateway"
    named = all(exchange.status == 400 and exchange.error.get("param") == "messages"
                and "messages" in str(exchange.error.get("message")) for exchange in exchanges)
    return (
        Check(named, "400 with a message that names the field", f"{first.status}, param {error.get('param')}"),
        Check(fastest < INSTANT, f"instant: under {INSTANT * 1000:.0f} ms", timing),
        Check(all(exchange.attempts == 0 for exchange in exchanges)
              and stats.openai.requests == stats.anthropic.requests == 0,
              "no provider call", f"x-orchestrator-attempts {first.attempts}; mock /stats: {stats.describe()}"),
    )


SCENARIOS = (
    Scenario(1, "normal success", "show the baseline: a request succeeds on the first try", normal_success),
    Scenario(2, "timeout -> retry", "show exponential backoff in action", timeout_retry),
    Scenario(3, "rate limit -> failover", "show automatic provider switching", rate_limit_failover),
    Scenario(4, "circuit breaker", "show protection from cascading failures", circuit_breaker),
    Scenario(5, "validation", "show fail-fast on invalid input", validation, needs_healthy_openai=False),
)


# -- formatting ----------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _waits_text(waits: tuple[float, ...], joiner: str = " -> ") -> str:
    return joiner.join(f"{wait:.2f} s" for wait in waits)


def _counted(counter: Counter[str]) -> str:
    return ", ".join(f"{count} x {what}" for what, count in sorted(counter.items()))
