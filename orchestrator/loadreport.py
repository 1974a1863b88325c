"""The load script's report: what became of each request, summed up, as text and as JSON.

:class:`Result` records one request; :class:`Summary` sums a group of them (one burst,
or the whole run); :class:`LoadReport` is the whole report. All are frozen values built
by named constructors from plain data, so they can be tested without a network.

Definitions (the same in the text report and in the JSON):

- **sent**: requests the load script started. ``sent == answered + lost``, always.
- **answered**: requests that got an HTTP status line, whatever came after. Each answer
  has exactly one *outcome*: ``ok`` (2xx with a whole body: a JSON completion, or an event
  stream that ended with ``data: [DONE]``), ``error`` (a non-2xx answer; its type is the
  body's ``error.code``, else ``error.type``, else ``http_<status>``), ``stream_error`` (a
  2xx stream that ended with a ``data:`` event carrying an ``error`` object: the gateway
  reporting a failure after the stream's commit point; typed like ``error``) or
  ``truncated`` (a 2xx whose body ended early: a stream with neither ``[DONE]`` nor an
  error event, a completion that is not a JSON completion, or a body cut by the
  connection or by ``--timeout``). Against this project's gateway ``truncated`` is 0.
- **lost**: requests that got no status line at all: refused or failed connections,
  resets, protocol errors, or ``--timeout`` expiring before the answer began.
- **attempts**: the gateway's ``x-orchestrator-attempts`` header (network attempts made
  upstream for the answer; a provider skipped without a call is not an attempt). Answers
  without the header count as ``missing``.
- **retried**: answers whose attempts > 1.
- **failovers**: answers whose ``x-orchestrator-provider`` is a provider other than the
  first deployment of the requested model's route (the *primary*, read from the
  gateway's ``GET /v1/models``): the request was moved to, or ended on, another provider,
  whether after a failed attempt or because the primary was skipped (circuit open,
  rate limited, saturated). ``none`` (no provider reached) is not a failover. Null when
  the primary is unknown.
- **latency**: of answered requests, from sending the request to the end of its body,
  in milliseconds; percentiles by nearest rank (p90 is the smallest latency that at
  least 90% of answers do not exceed).
- **wall** and **throughput**: wall time from the group's first send to its last answer
  or loss, in seconds; throughput is answers per second of that wall time (for the total
  in burst mode the pauses between bursts are included).

JSON (``--json PATH``; ``version`` 1). Times are seconds unless the name ends in ``_ms``;
counts are integers; maps of counts have string keys and omit zero entries unless said::

    {
      "version": 1,
      "gateway": "http://127.0.0.1:8080",           # str
      "mode": "bursts" | "rate",
      "parameters": {
        "bursts": int | null, "concurrency": int,   # concurrency: burst size, or the
        "interval_s": float | null,                 #   in-flight cap in rate mode
        "rate": float | null, "duration_s": float | null,
        "model": str, "stream": float,              # fraction of requests streamed, 0..1
        "timeout_s": float, "seed": int             # the seed used (drawn when not given)
      },
      "started_at": str,                            # ISO 8601 UTC, wall clock
      "primary_provider": str | null,
      "total": SUMMARY,
      "bursts": [SUMMARY + {"burst": int}],         # 1-based; [] in rate mode
      "schedule": null | {                          # rate mode only
        "planned": int,                             # round(rate * duration)
        "sent": int, "not_sent": int,               # not_sent: in-flight cap was full
        "late": int,                                # started more than 1/rate after due
        "lag_ms": PERCENTILES                       # start time minus due time
      },
      "upstream": null | {                          # with --mock-url only
        "mock_url": str,
        "requests": {"openai": int, "anthropic": int},   # deltas of the mock's /stats,
                                                         #   every personality, zeros too
        "outcomes": {"openai": {kind: int}, ...},        # deltas, zero entries omitted
        "disconnects": {"openai": int, "anthropic": int},# every personality, zeros too
        "total": int,                               # sum of "requests"
        "per_request": float | null,                # total / sent
        "header_attempts": int,                     # the gateway's count: total.attempts.total
        "header_per_request": float | null          # header_attempts / sent
      }
    }

    SUMMARY = {
      "sent": int, "answered": int, "lost": int,
      "streamed": int,                              # how many were sent with "stream": true
      "wall_s": float, "throughput_per_s": float | null,
      "status": {"200": int, ...},                  # sums to answered
      "provider": {"openai": int, "none": int, ...},# from the header; sums to answered
      "outcomes": {"ok": int, "error": int, "stream_error": int, "truncated": int},
                                                    # all four keys; sums to answered
      "attempts": {"distribution": {"1": int, ...}, "total": int,
                   "mean": float | null, "missing": int},
      "retried": int, "failovers": int | null,
      "latency_ms": PERCENTILES,
      "errors": {type: int},                        # sums to outcomes.error
      "stream_errors": {type: int},                 # sums to outcomes.stream_error
      "truncated": {reason: int},                   # no_done, invalid_body, timeout,
                                                    #   read_error, ...; sums to outcomes.truncated
      "lost_by_reason": {reason: int}               # connect_error, timeout, read_error,
                                                    #   remote_protocol_error, ...; sums to lost
    }

    PERCENTILES = {"p50": float | null, "p90": float | null,
                   "p99": float | null, "max": float | null}   # ms, null when empty
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs

__all__ = ["JSON_VERSION", "LoadReport", "Outcome", "Percentiles", "Result", "Schedule", "Summary", "Upstream"]

JSON_VERSION = 1

Outcome = Literal["ok", "error", "stream_error", "truncated", "lost"]
#: The outcomes of answered requests, in report order.
ANSWER_OUTCOMES: tuple[str, ...] = ("ok", "error", "stream_error", "truncated")


@attrs.frozen
class Result:
    """What became of one request.

    ``sent_at`` is seconds since the run started; ``elapsed`` seconds from sending to the
    end of the answer (or to giving up). ``detail`` is the error type (``error``,
    ``stream_error``), the truncation reason (``truncated``) or the loss reason
    (``lost``); None for ``ok``.
    """

    index: int
    burst: int | None
    stream: bool
    sent_at: float
    elapsed: float
    outcome: Outcome
    status: int | None = None
    provider: str | None = None
    attempts: int | None = None
    detail: str | None = None

    @property
    def answered(self) -> bool:
        return self.outcome != "lost"

    @property
    def finished_at(self) -> float:
        return self.sent_at + self.elapsed


@attrs.frozen
class Percentiles:
    """p50/p90/p99/max of a sample, in milliseconds (None for an empty sample)."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of_seconds(cls, sample: Iterable[float]) -> Percentiles:
        ordered = sorted(sample)
        if not ordered:
            return cls()
        return cls(*(_nearest_rank(ordered, p) * 1000 for p in (50, 90, 99)), ordered[-1] * 1000)

    def to_json(self) -> dict[str, float | None]:
        return {name: _round_ms(value) for name, value in attrs.asdict(self).items()}

    def render(self) -> str:
        if self.max is None:
            return "none"
        return ", ".join(f"{name} {value:.1f}" for name, value in attrs.asdict(self).items()) + " ms"


def _nearest_rank(ordered: Sequence[float], percent: float) -> float:
    return ordered[max(math.ceil(percent / 100 * len(ordered)), 1) - 1]


def _round_ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@attrs.frozen
class Attempts:
    """The distribution of ``x-orchestrator-attempts`` over a group's answers."""

    distribution: Mapping[int, int]
    missing: int

    @property
    def total(self) -> int:
        return sum(attempts * count for attempts, count in self.distribution.items())

    @property
    def mean(self) -> float | None:
        answers = sum(self.distribution.values())
        return self.total / answers if answers else None

    def to_json(self) -> dict[str, Any]:
        return {
            "distribution": {str(attempts): count for attempts, count in sorted(self.distribution.items())},
            "total": self.total,
            "mean": None if self.mean is None else round(self.mean, 4),
            "missing": self.missing,
        }


@attrs.frozen
class Summary:
    """One group of requests (a burst, or the whole run), summed up."""

    sent: int
    answered: int
    lost: int
    streamed: int
    wall: float
    status: Mapping[int, int]
    provider: Mapping[str, int]
    outcomes: Mapping[str, int]
    attempts: Attempts
    retried: int
    failovers: int | None
    latency: Percentiles
    errors: Mapping[str, int]
    stream_errors: Mapping[str, int]
    truncated: Mapping[str, int]
    lost_by_reason: Mapping[str, int]

    @classmethod
    def of(cls, results: Sequence[Result], *, primary: str | None, wall: float | None = None) -> Summary:
        """Sum up ``results``; ``wall`` defaults to first send to last finish among them."""
        answers = [result for result in results if result.answered]
        if wall is None:
            wall = _span(results)
        return cls(
            sent=len(results),
            answered=len(answers),
            lost=len(results) - len(answers),
            streamed=sum(result.stream for result in results),
            wall=wall,
            status=_count(result.status for result in answers),
            provider=_count(result.provider or "unknown" for result in answers),
            outcomes={outcome: sum(r.outcome == outcome for r in answers) for outcome in ANSWER_OUTCOMES},
            attempts=Attempts(
                _count(result.attempts for result in answers if result.attempts is not None),
                missing=sum(result.attempts is None for result in answers),
            ),
            retried=sum((result.attempts or 0) > 1 for result in answers),
            failovers=None if primary is None else sum(_failed_over(result, primary) for result in answers),
            latency=Percentiles.of_seconds(result.elapsed for result in answers),
            errors=_details(results, "error"),
            stream_errors=_details(results, "stream_error"),
            truncated=_details(results, "truncated"),
            lost_by_reason=_details(results, "lost"),
        )

    @property
    def throughput(self) -> float | None:
        """Answers per second of wall time."""
        return self.answered / self.wall if self.wall > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "streamed": self.streamed,
            "wall_s": round(self.wall, 6),
            "throughput_per_s": None if self.throughput is None else round(self.throughput, 3),
            "status": {str(status): count for status, count in sorted(self.status.items())},
            "provider": dict(sorted(self.provider.items())),
            "outcomes": dict(self.outcomes),
            "attempts": self.attempts.to_json(),
            "retried": self.retried,
            "failovers": self.failovers,
            "latency_ms": self.latency.to_json(),
            "errors": dict(sorted(self.errors.items())),
            "stream_errors": dict(sorted(self.stream_errors.items())),
            "truncated": dict(sorted(self.truncated.items())),
            "lost_by_reason": dict(sorted(self.lost_by_reason.items())),
        }


def _failed_over(result: Result, primary: str) -> bool:
    return result.provider not in (None, "none", primary)


def _span(results: Sequence[Result]) -> float:
    if not results:
        return 0.0
    return max(result.finished_at for result in results) - min(result.sent_at for result in results)


def _count(values: Iterable[Any]) -> dict[Any, int]:
    return dict(Counter(values))


def _details(results: Sequence[Result], outcome: str) -> dict[str, int]:
    return _count(result.detail or "unknown" for result in results if result.outcome == outcome)


@attrs.frozen
class Schedule:
    """How well an open-loop run kept its schedule."""

    rate: float
    planned: int
    sent: int
    not_sent: int
    late: int
    lag: Percentiles

    def to_json(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "sent": self.sent,
            "not_sent": self.not_sent,
            "late": self.late,
            "lag_ms": self.lag.to_json(),
        }


@attrs.frozen
class Upstream:
    """What the mock provider counted during the run (its ``/stats`` after minus before)."""

    mock_url: str
    requests: Mapping[str, int]
    outcomes: Mapping[str, Mapping[str, int]]
    disconnects: Mapping[str, int]
    sent: int
    header_attempts: int

    @classmethod
    def between(
        cls, before: Mapping[str, Any], after: Mapping[str, Any], *, mock_url: str, sent: int, header_attempts: int
    ) -> Upstream:
        """The difference of two ``GET /stats`` bodies. Raises ValueError on a foreign shape."""
        try:
            names = sorted(after)
            return cls(
                mock_url=mock_url,
                requests={name: after[name]["requests"] - before[name]["requests"] for name in names},
                outcomes={
                    name: {
                        kind: delta
                        for kind, count in after[name]["outcomes"].items()
                        if (delta := count - before[name]["outcomes"].get(kind, 0))
                    }
                    for name in names
                },
                disconnects={name: after[name]["disconnects"] - before[name]["disconnects"] for name in names},
                sent=sent,
                header_attempts=header_attempts,
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"the mock's /stats has an unexpected shape ({error!r})") from None

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def per_request(self) -> float | None:
        return self.total / self.sent if self.sent else None

    @property
    def header_per_request(self) -> float | None:
        return self.header_attempts / self.sent if self.sent else None

    def to_json(self) -> dict[str, Any]:
        return {
            "mock_url": self.mock_url,
            "requests": dict(self.requests),
            "outcomes": {name: dict(kinds) for name, kinds in self.outcomes.items()},
            "disconnects": dict(self.disconnects),
            "total": self.total,
            "per_request": _round_ratio(self.per_request),
            "header_attempts": self.header_attempts,
            "header_per_request": _round_ratio(self.header_per_request),
        }


def _round_ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@attrs.frozen
class LoadReport:
    """The whole report of one load run."""

    gateway: str
    mode: Literal["bursts", "rate"]
    parameters: Mapping[str, Any]
    started_at: str
    primary_provider: str | None
    total: Summary
    bursts: tuple[Summary, ...] = ()
    schedule: Schedule | None = None
    upstream: Upstream | None = None

    @property
    def exit_status(self) -> int:
        """1 when any request was lost or any answer truncated, else 0."""
        return 1 if self.total.lost or self.total.outcomes["truncated"] else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "gateway": self.gateway,
            "mode": self.mode,
            "parameters": dict(self.parameters),
            "started_at": self.started_at,
            "primary_provider": self.primary_provider,
            "total": self.total.to_json(),
            "bursts": [{"burst": number, **summary.to_json()} for number, summary in enumerate(self.bursts, 1)],
            "schedule": None if self.schedule is None else self.schedule.to_json(),
            "upstream": None if self.upstream is None else self.upstream.to_json(),
        }

    def render(self) -> str:
        """The report as plain text lines (what the README's Load section explains)."""
        lines = [self._headline()]
        if self.bursts:
            lines += _burst_table(self.bursts)
        lines.append("total")
        lines += [f"  {label:<14}{text}" for label, text in self._total_lines()]
        return "\n".join(lines)

    def _headline(self) -> str:
        p = self.parameters
        if self.mode == "bursts":
            shape = f"{p['bursts']} bursts of {p['concurrency']}, {p['interval_s']:g} s apart"
        else:
            shape = f"{p['rate']:g} requests/s for {p['duration_s']:g} s (at most {p['concurrency']} in flight)"
        streaming = {0.0: "non-streaming", 1.0: "streaming"}.get(p["stream"], f"{p['stream']:.0%} streaming")
        return (
            f"orchestrator load: {shape} -> {self.gateway}, model {p['model']}, {streaming}, "
            f"timeout {p['timeout_s']:g} s, seed {p['seed']}"
        )

    def _total_lines(self) -> list[tuple[str, str]]:
        total = self.total
        lines = [
            ("sent", f"{total.sent} = {total.answered} answered + {total.lost} lost"),
            ("status", _counts(total.status)),
            ("provider", _counts(total.provider)),
            ("outcomes", ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in total.outcomes.items())),
            ("attempts", _attempts(total.attempts)),
            ("failovers", _failovers(total, self.primary_provider)),
            ("latency", total.latency.render()),
            ("throughput", _throughput(total)),
            ("errors", _counts(total.errors)),
            ("stream errors", _counts(total.stream_errors)),
            ("truncated", _counts(total.truncated)),
            ("lost", _counts(total.lost_by_reason)),
        ]
        if self.schedule is not None:
            lines.append(("schedule", _schedule(self.schedule)))
        if self.upstream is not None:
            lines.append(("upstream", _upstream(self.upstream)))
        return lines


def _burst_table(bursts: Sequence[Summary]) -> list[str]:
    header = (
        f"{'burst':>5} {'sent':>5} {'answered':>8} {'lost':>4} {'ok':>5} {'errors':>6} {'attempts':>8} "
        f"{'failovers':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'answers/s':>9}"
    )
    rows = [header]
    for number, burst in enumerate(bursts, 1):
        errors = burst.answered - burst.outcomes["ok"]
        mean = "-" if burst.attempts.mean is None else f"{burst.attempts.mean:.2f}"
        failovers = "-" if burst.failovers is None else str(burst.failovers)
        latency = [("-" if value is None else f"{value:.1f}") for value in attrs.astuple(burst.latency)]
        throughput = "-" if burst.throughput is None else f"{burst.throughput:.1f}"
        rows.append(
            f"{number:>5} {burst.sent:>5} {burst.answered:>8} {burst.lost:>4} {burst.outcomes['ok']:>5} "
            f"{errors:>6} {mean:>8} {failovers:>9} {latency[0]:>8} {latency[1]:>8} {latency[2]:>8} "
            f"{latency[3]:>8} {throughput:>9}"
        )
    return rows


def _counts(counts: Mapping[Any, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{key}: {count}" for key, count in sorted(counts.items(), key=lambda item: str(item[0])))


def _attempts(attempts: Attempts) -> str:
    if attempts.mean is None:
        text = "none"
    else:
        text = f"{_counts(attempts.distribution)} (mean {attempts.mean:.2f}, total {attempts.total})"
    return text + (f", {attempts.missing} without the header" if attempts.missing else "")


def _failovers(total: Summary, primary: str | None) -> str:
    retried = f"retried {total.retried} (attempts > 1)"
    if primary is None:
        return f"unknown (GET /v1/models named no first provider for this model); {retried}"
    return f"{total.failovers} (answered by a provider other than {primary}); {retried}"


def _throughput(total: Summary) -> str:
    if total.throughput is None:
        return "none"
    return f"{total.throughput:.1f} answers/s ({total.answered} answers in {total.wall:.2f} s)"


def _schedule(schedule: Schedule) -> str:
    return (
        f"{schedule.planned} planned at {schedule.rate:g}/s: {schedule.sent} sent, "
        f"{schedule.not_sent} not sent (in-flight cap full), {schedule.late} late; "
        f"start lag {schedule.lag.render()}"
    )


def _upstream(upstream: Upstream) -> str:
    per_request = "-" if upstream.per_request is None else f"{upstream.per_request:.2f}"
    header = "-" if upstream.header_per_request is None else f"{upstream.header_per_request:.2f}"
    return (
        f"{upstream.total} mock requests ({_counts(upstream.requests)}) = {per_request} per request sent; "
        f"gateway headers say {header} ({upstream.header_attempts} attempts)"
    )
