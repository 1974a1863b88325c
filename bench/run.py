"""``make bench`` / ``python -m bench.run``: the mock, the gateway and LiteLLM, one table.

One run on loopback: start the mock (one process; 50 ms of latency through its
``/d50`` path prefix), then measure each target in turn with the same load generator
and the same settings -- the mock alone (``direct``), the gateway with one worker and
with two, and the LiteLLM proxy when ``make bench-peers`` has installed it. Every
target is measured at every mock latency (0, 50 ms), non-streaming and streaming
(``json``, ``stream``), at every concurrency (1, 50, 500 connections): a warm-up, then
``--duration`` measured seconds per cell.

Prints progress on stderr, then a markdown table and the issue's targets on stdout,
and writes everything (settings, machine, per-process CPU, refusals) as JSON to
``bench/results/``. Which cells are refused and why: :mod:`bench.report`.

Then each ratio target's pair of cells is measured again, its two sides alternating,
``--pair-rounds`` times, and the targets are judged on those rounds' medians (see
:mod:`bench.report`): the sweep measures the two sides of a ratio minutes apart.

``--smoke`` is the CI's tiny run: a fraction of a second per cell, two connections,
no LiteLLM, the built-in load generator unless ``--client`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.clients import Load, available_client, run_load
from bench.procs import MemorySampler, cpu_seconds, machine_busy_seconds, rss_bytes
from bench.report import CROWDED, MIB, NOISY, Cell, check_targets, compare, counted, notes, pairs, refusals, table
from bench.targets import (
    LITELLM_VERSION,
    REPO,
    Target,
    body_for,
    gateway_counts,
    litellm_binary,
    start_gateway,
    start_litellm,
    start_mock,
)

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("direct", "gateway-1", "gateway-2", "litellm")
MODES = ("json", "stream")
#: Of what each server logged during a cell with errors: the first lines (how it
#: began) and the last ones (how it ended).
LOG_LINES = (20, 10)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell (default 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 500], metavar="C")
    parser.add_argument("--latency-ms", type=int, nargs="+", default=[0, 50], choices=[0, 50], metavar="MS")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--client", choices=("auto", "wrk", "builtin"), default=None,
                        help="load generator (default: wrk if installed; --smoke: builtin)")
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a cell on a noisy machine")
    parser.add_argument("--pair-rounds", type=int, default=3, metavar="N",
                        help="interleaved re-measurements of each ratio target's two cells (default 3; 0: none)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="S",
                        help="before a cell, wait up to S seconds for other processes to leave the cores (default 60)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: bench/results/bench-<time>.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: checks the bench works, measures nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.retries, args.quiet_wait, args.concurrency = 0.3, 0.0, 0, 0.0, [2]
        args.pair_rounds = min(args.pair_rounds, 1)
        args.targets = [name for name in args.targets if name != "litellm"]
        args.client = args.client or "builtin"
    client = available_client(args.client or "auto")
    if client == "builtin" and not args.smoke:
        _progress("wrk is not installed (make bench-peers): the built-in Python generator will likely be the"
                  " bottleneck, and its cells refused")
    machine = _machine(client)
    _progress(f"{machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}, load generator"
              f" {machine['client']}; {args.duration:g} s per cell after {args.warmup:g} s of warm-up")

    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        workdir = Path(scratch)
        for latency in args.latency_ms:
            for mode in args.modes:
                (workdir / f"body-{latency}-{mode}.json").write_bytes(body_for(latency, stream=mode == "stream"))
        mock = start_mock(workdir)
        try:
            for name in args.targets:
                cells += _measure_target(name, mock, client, args, workdir)
            cells += _measure_pairs(cells, mock, client, args, workdir)
        finally:
            mock.server.stop()

    compare(cells)
    checks = check_targets(cells)
    print(table(cells, checks))
    output = args.output or RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "started": machine.pop("started"),
        "machine": machine,
        "settings": {key: value for key, value in vars(args).items() if key != "output"} | {"client": client},
        "cells": [cell.as_json() for cell in cells],
        "targets": [dataclasses.asdict(check) for check in checks],
    }, indent=2, default=str) + "\n")
    _progress(f"results: {output}")
    return 0


def _start(name: str, workdir: Path, mock: Target) -> Target | None:
    if name == "direct":
        return mock
    if name == "litellm":
        binary = litellm_binary()
        if binary is None:
            _progress("LiteLLM is not installed (.peers/litellm-venv): run `make bench-peers`; measuring without it")
            return None
        _progress(f"starting LiteLLM {LITELLM_VERSION} (about 6 s)")
        return start_litellm(workdir, mock.url, binary)
    return start_gateway(workdir, mock.url, workers=_workers(name))


def _workers(name: str) -> int:
    """How many workers the target called ``name`` runs: N for ``gateway-N``, else 0."""
    return int(name.removeprefix("gateway-")) if name.startswith("gateway-") else 0


def _measure_target(name: str, mock: Target, client: str, args: argparse.Namespace, workdir: Path) -> list[Cell]:
    """Every cell of one target, started here (the mock excepted) and stopped after.

    Memory growth is counted from the target's RSS when warm (every code path of the
    first cell has run, pools exist) and idle (nothing in flight). A gateway is
    restarted, and warmed at one connection, before each cell of ``CROWDED`` or more
    connections at the run's highest concurrency: RSS never shrinks back, so on a
    process that had already served another crowded cell, the growth would mix that
    cell's high-water mark with this one's. And any target (the mock excepted) is
    restarted after a crowded cell, so that no cell measures the last one's overload:
    a LiteLLM left with hundreds of timed-out requests answered 9 req/s where it
    otherwise answers about 50.
    """
    target = _start(name, workdir, mock)
    if target is None:
        return []
    crowded = max(args.concurrency)
    fresh_for_memory = name.startswith("gateway") and crowded >= CROWDED
    cells: list[Cell] = []
    idle: float | None = None
    try:
        for latency in args.latency_ms:
            for mode in args.modes:
                body = workdir / f"body-{latency}-{mode}.json"
                for connections in args.concurrency:
                    overloaded = bool(cells) and cells[-1].connections >= CROWDED and target is not mock
                    for_memory = fresh_for_memory and connections == crowded
                    if cells and (overloaded or for_memory):
                        target.server.stop()
                        target = _start(name, workdir, mock)
                        assert target is not None
                    if (cells and overloaded) or for_memory:
                        # Warm at one connection, so that the idle RSS is a warm process's
                        # (a crowded first cell would otherwise be its own baseline).
                        warm = Load(target.path(latency), body, mode == "stream", 1, max(args.warmup, 1.0),
                                    target.auth)
                        run_load(client, warm)
                        idle = None
                    if idle is None and (cells or for_memory):
                        idle = sum(rss_bytes(pid) for pid in target.server.pids()) / MIB
                    cell = _measure_load(target, mock, client, args, body, latency, mode, connections)
                    cells.append(cell)
                    if idle is None:  # the target's first cell has just warmed it up
                        idle = sum(rss_bytes(pid) for pid in target.server.pids()) / MIB
                    cell.rss_idle_mib = round(idle, 1)
    finally:
        if target is not mock:
            target.server.stop()
    return cells


def _measure_pairs(swept: list[Cell], mock: Target, client: str, args: argparse.Namespace, workdir: Path) -> list[Cell]:
    """Each ratio target's two cells again, alternating, ``--pair-rounds`` times.

    Only pairs whose both cells the sweep measured; the gateways are started afresh,
    once for all pairs, and stopped after.
    """
    measured_keys = {(cell.target, cell.key) for cell in swept}
    wanted = [(key, first, second) for key, first, second in pairs(max(args.concurrency))
              if (first, key) in measured_keys and (second, key) in measured_keys]
    if not wanted or args.pair_rounds < 1:
        return []
    started: dict[str, Target] = {}
    cells: list[Cell] = []
    # Rounds are numbered across the pairs: two pairs may share a cell (at a highest
    # concurrency of 50, gateway-1 at 50 ms / json / 50 is in both), and a target is
    # judged on the cells that share a round's number (see report._paired_rounds).
    number = 0
    try:
        for name in sorted({name for _, first, second in wanted for name in (first, second)}):
            target = _start(name, workdir, mock)
            assert target is not None  # pairs name the mock and gateways only
            started[name] = target
        for key, first, second in wanted:
            latency, mode, connections = key
            body = workdir / f"body-{latency}-{mode}.json"
            for index in range(1, args.pair_rounds + 1):
                _progress(f"interleaved round {index} of {args.pair_rounds}: {first} and {second},"
                          f" {latency} ms {mode} {connections} conns")
                number += 1
                for name in (first, second) if index % 2 else (second, first):
                    cell = _measure_load(started[name], mock, client, args, body, latency, mode, connections)
                    cell.pair_round = number
                    cells.append(cell)
    finally:
        for target in started.values():
            if target is not mock:
                target.server.stop()
    return cells


def _measure_load(
    target: Target, mock: Target, client: str, args: argparse.Namespace, body: Path, latency: int, mode: str,
    connections: int,
) -> Cell:
    """One cell, measured again (up to ``--retries`` times) while the machine is noisy."""
    pids = target.server.pids()
    load = Load(target.path(latency), body, mode == "stream", connections, args.duration, target.auth)
    for attempt in range(1, args.retries + 2):
        _wait_for_quiet([*pids, mock.server.pid], args.quiet_wait)
        if args.warmup:
            run_load(client, dataclasses.replace(load, duration=args.warmup))
        cell = _measure_cell(target, mock, client, load, pids, latency, mode)
        cell.attempts = attempt
        if attempt > args.retries or not any(reason.startswith("noisy") for reason in cell.refused):
            break
        _progress(f"  {cell.refused[-1]}: measuring again")
    refused = f"  [refused: {'; '.join(cell.refused)}]" if cell.refused else ""
    _progress(f"{target.name:>9} {latency:>2} ms {mode:<6} {connections:>3} conns: {cell.rps:7.0f} req/s"
              f"  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  errors {sum(cell.errors.values())}"
              f"{refused}")
    return cell


def _wait_for_quiet(ours: list[int], patience: float) -> None:
    """Block until other people's processes leave the cores alone, for ``patience`` s at most.

    Samples one second at a time: the machine's busy time minus this run's own
    processes. Gives up quietly: a cell measured on a busy machine is refused anyway.
    """
    if patience <= 0:
        return
    deadline = time.monotonic() + patience
    told = False
    while True:
        before = {pid: cpu_seconds(pid) for pid in ours}
        busy_before, self_before = machine_busy_seconds(), _own_cpu()
        time.sleep(1.0)
        ours_used = sum(cpu_seconds(pid) - before[pid] for pid in ours) + _own_cpu() - self_before
        others = machine_busy_seconds() - busy_before - ours_used
        if others < NOISY or time.monotonic() >= deadline:
            return
        if not told:
            _progress(f"  the machine is busy with other work ({others:.2f} cores): waiting up to {patience:g} s")
            told = True


def _measure_cell(
    target: Target, mock: Target, client: str, load: Load, pids: list[int], latency: int, mode: str
) -> Cell:
    """One measured run of ``load``: the load generator's figures, and what it cost whom.

    A gateway is also asked what its providers counted (before and after, outside the
    measured seconds), and a cell with errors keeps what the servers logged during it,
    in part (``LOG_LINES``): the bench's working directory, logs and all, is gone when
    the run ends.
    """
    workers = _workers(target.name)
    counts_before = gateway_counts(target, workers) if workers else {}
    servers = [target.server] if target is mock else [target.server, mock.server]
    log_marks = [server.log_size() for server in servers]
    watched = list(dict.fromkeys([*pids, mock.server.pid]))
    cpu_before = {pid: cpu_seconds(pid) for pid in watched}
    busy_before = machine_busy_seconds()
    self_before = _own_cpu()
    started = time.monotonic()
    with MemorySampler(lambda: pids) as memory:
        result = run_load(client, load)
    wall = time.monotonic() - started
    used = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in watched}
    busy = machine_busy_seconds() - busy_before
    ours = sum(used.values()) + result.client_cpu + (_own_cpu() - self_before)
    counts = counted(counts_before, gateway_counts(target, workers)) if workers else {}
    processes = [{"pid": pid, "role": _role(target, pids, pid), "cpu_s": round(used[pid], 3)} for pid in pids]
    cell = Cell(
        target=target.name,
        latency_ms=latency,
        mode=mode,
        connections=load.connections,
        requests=result.requests,
        duration=result.duration,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.errors,
        processes=processes,
        rss_idle_mib=0.0,  # set by _measure_target: the process's warm, idle RSS
        rss_peak_mib=round(memory.peak / MIB, 1),
        mock_cpu=used[mock.server.pid] / wall,
        client_cpu=result.client_cpu / wall,
        others_cpu=max(0.0, busy - ours) / wall,
        provider_counts=counts,
    )
    if result.error_count:
        cell.logs = {server.name: _within_checkout(server.log_since(mark, first=LOG_LINES[0], last=LOG_LINES[1]))
                     for server, mark in zip(servers, log_marks, strict=True)}
    cell.refused = refusals(cell, client)
    cell.notes = notes(cell)
    return cell


def _within_checkout(lines: list[str]) -> list[str]:
    """Log lines with the checkout's absolute path taken out of them (tracebacks name
    files by it): results kept in the repository say nothing of the machine."""
    root = f"{REPO}{os.sep}"
    return [line.replace(root, "") for line in lines]


def _role(target: Target, pids: list[int], pid: int) -> str:
    if len(pids) == 1:
        return target.name
    return "supervisor" if pid == pids[0] else f"worker {pids.index(pid)}"


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine(client: str) -> dict[str, object]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    client_version = "bench.loadgen (Python, built in)"
    if client == "wrk":
        probe = subprocess.run([shutil.which("wrk") or "wrk", "-v"], capture_output=True, text=True, check=False)
        client_version = " ".join((probe.stdout or probe.stderr).split()[:2])  # "wrk debian/4.1.0-3+b2"
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_model": model,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "client": client_version,
        "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
