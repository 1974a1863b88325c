"""Judging a run: which cells count, the ratios between targets, the issue's targets.

A **cell** is one target under one load (mock latency, streaming or not, connections).
It is **refused** -- shown, but never used in a ratio or a target -- when any of these
held over its measured seconds (the machine has two cores, shared with the mock, the
load generator and, on a shared box, other people's work):

- **errors** above 0.1% of requests (connect, read, write, timeout, non-2xx, and
  streams that ended without ``data: [DONE]``);
- **load generator saturated**: wrk (one thread) or the built-in generator used 90% or
  more of one core: it, not the target, set the pace;
- **mock saturated**, with more than one connection: the mock (one single-threaded
  process) used 90% or more of one core, so requests queued in it and its own
  ceiling set the pace. For ``direct`` cells this is the mock measuring itself, so a
  direct cell refused for it is no baseline either. With one connection nothing ever
  queues (a closed loop keeps one request in flight), and a mock kept busy the whole
  time is just what a latency measurement at concurrency 1 looks like;
- **noisy machine**: processes outside the run used 0.3 cores or more on average
  (measured as the machine's busy time minus the run's own processes). Such a cell is
  measured again, up to ``--retries`` times, before it is refused.

The gateway itself saturating a core is *not* a refusal: that is what is measured.
Neither is the machine being busy with the run's own processes: the gateway competes
for the two cores with the mock and wrk, as the issue's targets say.

A cell may also carry **notes**, which refuse nothing. A gateway cell names what its
providers counted over the cell besides answers and cancellations (failures by class,
refusals such as ``circuit_open``, circuit transitions), from ``/health`` before and
after; with errors it also keeps the first and last lines the target and the mock
logged during it. A direct cell whose median latency exceeds the mock's by more than a
quarter (plus 5 ms) says the mock queued requests although it had CPU to spare. That
is this mock's closed-loop behaviour: the 50 connections' requests arrive together,
the single-threaded mock parses them one after another, they sleep the same 50 ms and
come back together. Direct throughput is then the mock's ceiling for that load, not
``connections / latency``, and a target that needs more than that ceiling cannot show
it: two workers are judged at the run's highest concurrency, where one worker, not the
offered load, is the limit.

**Interleaved rounds.** A ratio target compares two cells, and in a sweep they are
measured minutes apart, on a machine whose speed drifts over minutes. So ``bench.run``
measures each target's pair of cells again after the sweep (``pairs``), alternating
the two sides, ``--pair-rounds`` times (A B, B A, A B, ...). A target is judged on the
median, over the rounds in which both sides are usable, of each round's own ratio (or
difference, for latency): the two sides of a round ran a few seconds apart, so a slow
minute weighs on both, where a median of each side could pair one side's slow round
with the other's fast one. The figures shown beside it are each side's medians. The
table shows the sweep.

``python -m bench.report RESULTS.json`` prints a saved run's table again, judged by
the rules above.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from statistics import median
from typing import Any

__all__ = [
    "CROWDED", "Cell", "TargetCheck", "check_targets", "compare", "counted", "notes", "pairs", "refusals", "table",
]

MAX_ERROR_RATE = 0.001
#: Connections from which a cell counts for the memory target ("500 in flight").
CROWDED = 500
SATURATED = 0.90
NOISY = 0.30
MIB = 1024 * 1024
#: A provider actor's counts (``/health`` totals) that say nothing went wrong: answers,
#: and attempts whose client left (every cell ends with its connections closed
#: mid-request). The rest are failures by class, refusals by reason, the circuit's
#: ``circuit_transitions``, and ``connections_replaced`` (kept-alive connections the
#: provider closed as a request went out: no failure, but worth seeing).
ROUTINE = frozenset({"ok", "cancelled"})


@dataclass
class Cell:
    target: str
    latency_ms: int
    mode: str
    connections: int
    requests: int
    duration: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    #: CPU seconds of the target's processes over the cell, by process.
    processes: list[dict[str, Any]]
    rss_idle_mib: float
    rss_peak_mib: float
    mock_cpu: float
    client_cpu: float
    others_cpu: float
    attempts: int = 1
    #: 0: measured in the sweep; n: in the run's n-th interleaved round (numbered across
    #: the pairs, so a round's two cells, and only they, share its number).
    pair_round: int = 0
    #: How many interleaved rounds these figures are the medians of (0: none, the
    #: sweep's or one round's own measurement; see ``_medians``).
    merged: int = 0
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    vs_direct: float | None = None
    vs_litellm: float | None = None
    #: A gateway's provider actors' counts over the cell, workers summed (``counted``):
    #: ``{provider: {outcome or refusal: count}}``, non-zero counts only.
    provider_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: For a cell with errors: what the target and the mock logged during it, in part.
    logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.latency_ms, self.mode, self.connections)

    @property
    def valid(self) -> bool:
        return not self.refused

    @property
    def target_cpu(self) -> float:
        return sum(process["cpu_s"] for process in self.processes)

    @property
    def cpu_per_request_ms(self) -> float:
        return 1000 * self.target_cpu / self.requests if self.requests else 0.0

    @property
    def error_rate(self) -> float:
        total = self.requests + self.errors.get("connect", 0) + self.errors.get("timeout", 0)
        return sum(self.errors.values()) / total if total else 1.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        return cls(**{each.name: data[each.name] for each in fields(cls) if each.name in data})

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(valid=self.valid, target_cpu_s=round(self.target_cpu, 3),
                    cpu_per_request_ms=round(self.cpu_per_request_ms, 3), error_rate=self.error_rate)
        return data


def refusals(cell: Cell, client: str) -> list[str]:
    """Why ``cell`` cannot be used (empty: it can). See the module docstring."""
    reasons = []
    if cell.error_rate > MAX_ERROR_RATE:
        reasons.append(f"errors {100 * cell.error_rate:.2f}% > {100 * MAX_ERROR_RATE:g}%")
    if cell.client_cpu >= SATURATED:
        reasons.append(f"{client} at {100 * cell.client_cpu:.0f}% of a core")
    if cell.mock_cpu >= SATURATED and cell.connections > 1:
        reasons.append(f"mock at {100 * cell.mock_cpu:.0f}% of a core")
    if cell.others_cpu >= NOISY:
        reasons.append(f"noisy: other processes used {cell.others_cpu:.2f} cores")
    return reasons


def notes(cell: Cell) -> list[str]:
    """What a reader of ``cell`` should know that refuses nothing (module docstring)."""
    found = []
    if cell.target == "direct" and cell.connections > 1 and cell.p50_ms > 1.25 * cell.latency_ms + 5:
        found.append(f"mock queues: p50 {cell.p50_ms:.0f} ms for a {cell.latency_ms} ms mock")
    for provider, counts in cell.provider_counts.items():
        unusual = {name: count for name, count in counts.items() if name not in ROUTINE}
        if unusual:
            listed = ", ".join(f"{name} {count:,}" for name, count in sorted(unusual.items()))
            found.append(f"gateway's calls to {provider}: {listed} (ok {counts.get('ok', 0):,})")
    return found


def counted(
    before: dict[int, dict[str, dict[str, int]]], after: dict[int, dict[str, dict[str, int]]]
) -> dict[str, dict[str, int]]:
    """What the providers counted between two ``targets.gateway_counts``, summed over the
    workers that answered both times: ``{provider: {outcome or refusal: count}}``,
    non-zero counts only."""
    total: dict[str, dict[str, int]] = {}
    for pid in before.keys() & after.keys():
        for provider, counts in after[pid].items():
            earlier = before[pid].get(provider, {})
            sums = total.setdefault(provider, {})
            for name, count in counts.items():
                sums[name] = sums.get(name, 0) + count - earlier.get(name, 0)
    return {provider: {name: count for name, count in sums.items() if count}
            for provider, sums in total.items() if any(sums.values())}


def pairs(highest: int) -> list[tuple[tuple[int, str, int], str, str]]:
    """The cells each ratio target compares: (cell key, target, the one it is compared
    with). ``highest`` is the run's highest concurrency (see the two-worker target)."""
    return [
        ((50, "json", 50), "gateway-1", "direct"),  # throughput vs direct
        ((0, "json", 1), "gateway-1", "direct"),  # latency added
        ((50, "json", highest), "gateway-2", "gateway-1"),  # two workers
        ((50, "stream", highest), "gateway-2", "gateway-1"),  # ... for streams too
    ]


def compare(cells: list[Cell]) -> None:
    """Fill in latency added over direct and throughput ratios, from the sweep's valid
    cells only."""
    by_target = {(cell.target, cell.key): cell for cell in cells if not cell.pair_round}
    for cell in cells:
        if not cell.valid or cell.pair_round:
            continue
        direct = by_target.get(("direct", cell.key))
        if cell.target != "direct" and direct is not None and direct.valid:
            cell.added_p50_ms = cell.p50_ms - direct.p50_ms
            cell.added_p99_ms = cell.p99_ms - direct.p99_ms
            cell.vs_direct = cell.rps / direct.rps if direct.rps else None
        litellm = by_target.get(("litellm", cell.key))
        if cell.target.startswith("gateway") and litellm is not None and litellm.valid and litellm.rps:
            cell.vs_litellm = cell.rps / litellm.rps


@dataclass
class TargetCheck:
    name: str
    goal: str
    value: str
    met: bool | None  # None: not measurable in this run (the detail says why)
    detail: str = ""


def check_targets(cells: list[Cell]) -> list[TargetCheck]:
    """The issue's targets, each from this run's cells (a pair's interleaved rounds,
    where measured, in place of its sweep cells)."""
    find = _representatives(cells)
    checks = []

    def usable(*wanted: tuple[str, tuple[int, str, int]]) -> tuple[list[Cell], str]:
        found = []
        for name, key in wanted:
            cell = find.get((name, key))
            if cell is None:
                return [], f"{name} {_describe(key)} not in this run"
            if not cell.valid:
                return [], f"{name} {_describe(key)} refused: {'; '.join(cell.refused)}"
            found.append(cell)
        return found, ""

    def throughput_ratio(first: Cell, second: Cell) -> tuple[float, str]:
        """``first``'s throughput over ``second``'s, and how it was measured."""
        paired = _paired_rounds(cells, first.target, second.target, first.key)
        ratios = [one.rps / other.rps for one, other in paired]
        return _judged(ratios, first.rps / second.rps), _basis(first, second) + _round_by_round(ratios, first, second)

    key = (50, "json", 50)
    found, why = usable(("gateway-1", key), ("direct", key))
    if found:
        ratio, basis = throughput_ratio(*found)
        checks.append(TargetCheck("throughput vs direct", "≥ 0.80 × direct at 50 ms, 50 connections, 1 worker",
                                  f"{ratio:.2f} ×", ratio >= 0.8,
                                  f"{found[0].rps:.0f} vs {found[1].rps:.0f} req/s{basis}"))
    else:
        checks.append(TargetCheck("throughput vs direct", "≥ 0.80 × direct at 50 ms, 50 connections, 1 worker",
                                  "—", None, why))
    found, why = usable(("gateway-1", key), ("litellm", key))
    if found:
        ratio, basis = throughput_ratio(*found)
        checks.append(TargetCheck("throughput vs LiteLLM", "≥ 6 × LiteLLM at 50 ms, 50 connections, 1 worker",
                                  f"{ratio:.1f} ×", ratio >= 6,
                                  f"{found[0].rps:.0f} vs {found[1].rps:.0f} req/s{basis}"))
    else:
        checks.append(TargetCheck("throughput vs LiteLLM", "≥ 6 × LiteLLM at 50 ms, 50 connections, 1 worker",
                                  "—", None, why))

    key = (0, "json", 1)
    found, why = usable(("gateway-1", key), ("direct", key))
    if found:
        paired = _paired_rounds(cells, "gateway-1", "direct", key)
        p50s = [one.p50_ms - other.p50_ms for one, other in paired]
        p99s = [one.p99_ms - other.p99_ms for one, other in paired]
        added_p50 = _judged(p50s, found[0].p50_ms - found[1].p50_ms)
        added_p99 = _judged(p99s, found[0].p99_ms - found[1].p99_ms)
        basis = _basis(*found)
        if listing := _round_by_round(p50s, *found, label=" (p50)"):
            basis += listing + _round_by_round(p99s, *found, label=" (p99)", lead="; ")
        checks.append(TargetCheck("latency added", "p50 ≤ 1 ms and p99 ≤ 3 ms at 0 ms, concurrency 1",
                                  f"p50 {added_p50:+.2f} ms, p99 {added_p99:+.2f} ms",
                                  added_p50 <= 1.0 and added_p99 <= 3.0, basis.removeprefix("; ")))
    else:
        checks.append(TargetCheck("latency added", "p50 ≤ 1 ms and p99 ≤ 3 ms at 0 ms, concurrency 1", "—", None, why))

    crowded = [cell for cell in cells
               if cell.target == "gateway-1" and cell.connections >= CROWDED and not cell.pair_round]
    if crowded:
        errors = sum(sum(cell.errors.values()) for cell in crowded)
        growth = max((cell.rss_peak_mib - cell.rss_idle_mib) * 1000 / cell.connections for cell in crowded)
        checks.append(TargetCheck("500 in flight", "no errors; RSS growth ≤ 40 MiB per 1,000 in flight",
                                  f"{errors} errors; {growth:.1f} MiB per 1,000", errors == 0 and growth <= 40,
                                  f"worst of {len(crowded)} cells of 500 connections, each on a fresh process:"
                                  f" peak RSS during the cell minus the process's warm, idle RSS"))
    else:
        checks.append(TargetCheck("500 in flight", "no errors; RSS growth ≤ 40 MiB per 1,000 in flight", "—", None,
                                  "no gateway-1 cell with 500 connections in this run"))

    # One worker is the bottleneck only where the offered load exceeds what it serves:
    # at 50 connections a 50 ms mock caps every target near 50 / 0.05 s = 1,000 req/s.
    # The issue names no mode: both are judged, since a worker's share of the two cores
    # depends on what it costs next to the mock (a stream costs it more, json less).
    crowded = max((cell.connections for cell in cells if cell.target == "gateway-2"), default=0)
    for mode in ("json", "stream"):
        key = (50, mode, crowded)
        name = f"two workers, {mode}"
        goal = f"≥ 1.4 × one worker at 50 ms, {crowded} connections"
        found, why = usable(("gateway-2", key), ("gateway-1", key))
        if found:
            two, one = found
            ratio, basis = throughput_ratio(two, one)
            checks.append(TargetCheck(name, goal, f"{ratio:.2f} ×", ratio >= 1.4, _cpu_story(two, one) + basis))
        else:
            checks.append(TargetCheck(name, "≥ 1.4 × one worker at 50 ms", "—", None, why))
    return checks


def _representatives(cells: list[Cell]) -> dict[tuple[str, tuple[int, str, int]], Cell]:
    """Each (target, key)'s cell: its interleaved rounds' medians where it has usable
    rounds, else its sweep cell (a pair whose every round was refused shows one)."""
    found = {(cell.target, cell.key): cell for cell in cells if not cell.pair_round}
    rounds: dict[tuple[str, tuple[int, str, int]], list[Cell]] = {}
    for cell in cells:
        if cell.pair_round:
            rounds.setdefault((cell.target, cell.key), []).append(cell)
    for where, measured in rounds.items():
        usable = [cell for cell in measured if cell.valid]
        found[where] = _medians(usable) if usable else measured[-1]
    return found


def _medians(rounds: list[Cell]) -> Cell:
    """One cell standing for ``rounds``: median throughput and latencies; CPU, requests
    and time summed (so CPU per request and shares of a core stay true); worst memory."""
    cpu: dict[str, float] = {}
    for cell in rounds:
        for process in cell.processes:
            cpu[process["role"]] = cpu.get(process["role"], 0.0) + process["cpu_s"]
    duration = sum(cell.duration for cell in rounds)
    return replace(
        rounds[0],
        requests=sum(cell.requests for cell in rounds),
        duration=duration,
        rps=median(cell.rps for cell in rounds),
        p50_ms=median(cell.p50_ms for cell in rounds),
        p99_ms=median(cell.p99_ms for cell in rounds),
        errors={name: sum(cell.errors.get(name, 0) for cell in rounds) for name in rounds[0].errors},
        processes=[{"pid": None, "role": role, "cpu_s": seconds} for role, seconds in cpu.items()],
        rss_peak_mib=max(cell.rss_peak_mib for cell in rounds),
        mock_cpu=sum(cell.mock_cpu * cell.duration for cell in rounds) / duration,
        client_cpu=sum(cell.client_cpu * cell.duration for cell in rounds) / duration,
        others_cpu=sum(cell.others_cpu * cell.duration for cell in rounds) / duration,
        pair_round=0,
        merged=len(rounds),
    )


def _paired_rounds(cells: list[Cell], first: str, second: str, key: tuple[int, str, int]) -> list[tuple[Cell, Cell]]:
    """The interleaved rounds in which both ``first`` and ``second`` measured ``key``
    usably, as (first's cell, second's cell), in round order."""
    rounds: dict[int, dict[str, Cell]] = {}
    for cell in cells:
        if cell.pair_round and cell.key == key and cell.target in (first, second) and cell.valid:
            rounds.setdefault(cell.pair_round, {})[cell.target] = cell
    return [(sides[first], sides[second]) for _, sides in sorted(rounds.items()) if len(sides) == 2]


def _judged(per_round: list[float], fallback: float) -> float:
    """The median of a target's per-round values; ``fallback`` (each side's medians, or
    the sweep's cells) when no round has both sides usable."""
    return median(per_round) if per_round else fallback


def _round_by_round(per_round: list[float], *cells: Cell, label: str = "", lead: str = "") -> str:
    """What ``_judged`` took the median of, for a target's detail; nothing where that is
    the figures shown already (one round, in which each side was measured once)."""
    if not per_round or (len(per_round) == 1 and all(cell.merged <= 1 for cell in cells)):
        return ""
    shown = ", ".join(f"{value:.2f}" for value in per_round)
    if not lead:
        lead = ("; judged on the median of each round's own: " if len(per_round) > 1
                else "; judged on the one round both sides measured usably: ")
    return f"{lead}{shown}{label}"


def _basis(*cells: Cell) -> str:
    """How the figures of a target's cells were measured, when not in the sweep."""
    counts = sorted({cell.merged for cell in cells if cell.merged})
    if not counts:
        return ""
    rounds = "round" if counts == [1] else "rounds"
    return f"; medians of {' and '.join(map(str, counts))} interleaved {rounds}"


def _cpu_story(two: Cell, one: Cell) -> str:
    """Who used the cores with two workers, and the throughput those costs allow."""
    cpu = ", ".join(f"{process['role']} {100 * process['cpu_s'] / two.duration:.0f}%" for process in two.processes)
    story = f"CPU of a core: {cpu}, mock {100 * two.mock_cpu:.0f}%, load generator {100 * two.client_cpu:.0f}%"
    if two.requests:
        # Per request, what every process on the box spent; the cores bound the sum.
        per_request = (two.target_cpu + (two.mock_cpu + two.client_cpu) * two.duration) / two.requests
        ceiling = len(os.sched_getaffinity(0)) / per_request
        story += (f"; at {per_request * 1000:.2f} ms of CPU per request over gateway, mock and load generator,"
                  f" {len(os.sched_getaffinity(0))} cores allow at most {ceiling:.0f} req/s,"
                  f" {ceiling / one.rps:.2f} × one worker's {one.rps:.0f}")
    return story


def _describe(key: tuple[int, str, int]) -> str:
    latency, mode, connections = key
    return f"({latency} ms, {mode}, {connections} connections)"


def _number(value: float | None, digits: int = 1, *, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def table(cells: list[Cell], checks: list[TargetCheck]) -> str:
    """The run as markdown: one row per cell, then the targets."""
    lines = [
        "| mock | mode | conns | target | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | × direct | × LiteLLM"
        " | CPU ms/req | peak RSS MiB | errors | mock CPU | client CPU | refused because / notes |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {"direct": 0, "gateway-1": 1, "gateway-2": 2, "litellm": 3}
    swept = [cell for cell in cells if not cell.pair_round]
    for cell in sorted(swept, key=lambda cell: (cell.key, order.get(cell.target, 9))):
        lines.append(
            f"| {cell.latency_ms} ms | {cell.mode} | {cell.connections} | {cell.target} | {cell.rps:.0f}"
            f" | {cell.p50_ms:.2f} | {cell.p99_ms:.2f} | {_number(cell.added_p50_ms, 2, sign=True)}"
            f" | {_number(cell.added_p99_ms, 2, sign=True)} | {_number(cell.vs_direct, 2)}"
            f" | {_number(cell.vs_litellm, 1)} | {cell.cpu_per_request_ms:.2f} | {cell.rss_peak_mib:.0f}"
            f" | {sum(cell.errors.values())} | {100 * cell.mock_cpu:.0f}% | {100 * cell.client_cpu:.0f}%"
            f" | {'; '.join([*(f'**{reason}**' for reason in cell.refused), *cell.notes])} |"
        )
    lines += ["", "| target | goal | this run | met |", "|---|---|---|---|"]
    for check in checks:
        met = {True: "yes", False: "**no**", None: "not measured"}[check.met]
        detail = f" ({check.detail})" if check.detail else ""
        lines.append(f"| {check.name} | {check.goal} | {check.value}{detail} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print a saved run (``bench/results/*.json``) as ``make bench`` printed it."""
    [path] = argv if argv is not None else sys.argv[1:]
    run = json.loads(Path(path).read_text())
    cells = [Cell.from_json(data) for data in run["cells"]]
    for cell in cells:
        cell.refused = refusals(cell, run["settings"]["client"])
        cell.notes = notes(cell)
        cell.added_p50_ms = cell.added_p99_ms = cell.vs_direct = cell.vs_litellm = None
    compare(cells)
    print(table(cells, check_targets(cells)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
