"""Judging a bench run (``bench.report``) on made-up cells: no process, no clock."""

from __future__ import annotations

import pytest

from bench.report import Cell, check_targets, compare, counted, notes, table


def cell(target: str, *, rps: float, p50: float = 1.0, p99: float = 2.0, connections: int = 1, latency: int = 0,
         pair_round: int = 0, refused: list[str] | None = None) -> Cell:
    return Cell(
        target=target, latency_ms=latency, mode="json", connections=connections, requests=int(rps * 10),
        duration=10.0, rps=rps, p50_ms=p50, p99_ms=p99, errors={"status": 0},
        processes=[{"pid": 1, "role": target, "cpu_s": 5.0}], rss_idle_mib=50.0, rss_peak_mib=60.0,
        mock_cpu=0.5, client_cpu=0.1, others_cpu=0.0, pair_round=pair_round, refused=refused or [],
    )


def target_check(cells: list[Cell], name: str):
    """The check of the target called ``name``, judged on ``cells``."""
    [check] = [check for check in check_targets(cells) if check.name == name]
    return check


def latency_check(cells: list[Cell]):
    return target_check(cells, "latency added")


def test_targets_are_judged_on_the_medians_of_the_interleaved_rounds():
    cells = [
        cell("direct", rps=1000, p50=0.5, p99=1.0),
        cell("gateway-1", rps=400, p50=2.5, p99=4.0),  # the sweep caught a slow minute
        *(cell("direct", rps=1000, p50=p50, p99=1.0, pair_round=index) for index, p50 in enumerate([0.5, 0.6, 0.4], 1)),
        *(cell("gateway-1", rps=600, p50=p50, p99=2.0, pair_round=index)
          for index, p50 in enumerate([1.4, 1.2, 9.0], 1)),
    ]
    check = latency_check(cells)
    assert check.value == "p50 +0.90 ms, p99 +1.00 ms"  # medians of 0.9, 0.6, 8.6 and of 1.0, 1.0, 1.0
    assert check.met is True
    assert check.detail == ("medians of 3 interleaved rounds; judged on the median of each round's own:"
                            " 0.90, 0.60, 8.60 (p50); 1.00, 1.00, 1.00 (p99)")


def test_a_ratio_is_the_median_of_each_rounds_own():
    # The medians of each side (1,860 and 1,232) would pair the second worker's fast
    # rounds with the first's slow one: 1.51. Round by round it is 1.16, 1.27, 1.54.
    cells = [
        cell("gateway-2", rps=1700, latency=50, connections=500),
        cell("gateway-1", rps=1550, latency=50, connections=500),
        *(cell(name, rps=rps, latency=50, connections=500, pair_round=index)
          for index, sides in enumerate([(1300, 1125), (1860, 1470), (1900, 1232)], 1)
          for name, rps in zip(["gateway-2", "gateway-1"], sides)),
    ]
    check = target_check(cells, "two workers, json")
    assert check.value == "1.27 ×" and check.met is False
    assert check.detail.endswith("medians of 3 interleaved rounds; judged on the median of each round's own:"
                                 " 1.16, 1.27, 1.54")


def test_a_refused_round_is_left_out_and_a_pair_without_usable_rounds_is_refused():
    cells = [
        cell("direct", rps=1000, p50=0.5),
        cell("gateway-1", rps=600, p50=1.2),
        cell("direct", rps=1000, p50=0.5, pair_round=1),
        cell("gateway-1", rps=600, p50=1.2, pair_round=1),
        cell("gateway-1", rps=600, p50=9.0, pair_round=2, refused=["noisy: other processes used 0.50 cores"]),
    ]
    assert latency_check(cells).value == "p50 +0.70 ms, p99 +0.00 ms"
    cells[3].refused = ["noisy: other processes used 0.50 cores"]
    check = latency_check(cells)
    assert check.met is None and "refused: noisy" in check.detail


def test_the_table_and_the_ratios_show_the_sweep_only():
    cells = [
        cell("direct", rps=1000, p50=0.5),
        cell("gateway-1", rps=500, p50=1.5),
        cell("gateway-1", rps=900, p50=0.9, pair_round=1),
        cell("direct", rps=1000, p50=0.5, pair_round=1),
    ]
    compare(cells)
    assert cells[1].added_p50_ms == pytest.approx(1.0) and cells[2].added_p50_ms is None
    rows = [line for line in table(cells, []).splitlines() if line.startswith("| 0 ms")]
    assert len(rows) == 2 and "| 500 |" in rows[1]


def test_the_memory_target_ignores_the_rounds():
    cells = [
        cell("gateway-1", rps=800, connections=500),
        cell("gateway-1", rps=800, connections=500, pair_round=1),
    ]
    cells[1].rss_idle_mib = 0.0  # a round's cell has no idle baseline
    check = target_check(cells, "500 in flight")
    assert check.value == "0 errors; 20.0 MiB per 1,000" and check.met is True


def test_a_ratio_pairs_each_round_with_its_own_partner_only():
    # At a highest concurrency of 50, gateway-1's 50 ms json cell is in two pairs (with
    # direct, and with gateway-2); rounds are numbered across pairs, so throughput vs
    # direct takes direct's rounds 1-3 with gateway-1's rounds 1-3, not its 4-6.
    key = {"latency": 50, "connections": 50}
    cells = [
        cell("direct", rps=1000, **key), cell("gateway-1", rps=900, **key), cell("gateway-2", rps=1200, **key),
        *(cell(name, rps=rps, pair_round=index, **key)
          for index, sides in enumerate([(900, 1000), (880, 1000), (910, 1000)], 1)
          for name, rps in zip(["gateway-1", "direct"], sides)),
        *(cell(name, rps=rps, pair_round=index, **key)
          for index, sides in enumerate([(1200, 400), (1250, 450), (1300, 420)], 4)
          for name, rps in zip(["gateway-2", "gateway-1"], sides)),
    ]
    check = target_check(cells, "throughput vs direct")
    assert check.value == "0.90 ×"
    assert check.detail.endswith("judged on the median of each round's own: 0.90, 0.88, 0.91")


def test_a_verdict_on_one_paired_round_says_so():
    cells = [
        cell("direct", rps=1000, p50=0.5),
        cell("gateway-1", rps=600, p50=1.2),
        cell("direct", rps=1000, p50=0.5, pair_round=1),
        cell("gateway-1", rps=600, p50=1.1, pair_round=1),
        cell("gateway-1", rps=600, p50=1.3, pair_round=2),
        cell("direct", rps=1000, p50=0.9, pair_round=2, refused=["noisy: other processes used 0.50 cores"]),
        cell("gateway-1", rps=600, p50=1.4, pair_round=3),
        cell("direct", rps=1000, p50=0.9, pair_round=3, refused=["noisy: other processes used 0.50 cores"]),
    ]
    check = latency_check(cells)
    assert check.value == "p50 +0.60 ms, p99 +0.00 ms"  # round 1's: 1.1 - 0.5
    assert check.detail == ("medians of 1 and 3 interleaved rounds; judged on the one round both sides measured"
                            " usably: 0.60 (p50); 0.00 (p99)")


# -- which processes a run measures fresh (bench.run, with the processes faked) -------


class FakeServer:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.pid = log, name, 1

    def pids(self) -> list[int]:
        return [self.pid]

    def stop(self) -> None:
        self.log.append(f"stop {self.name}")


@pytest.mark.parametrize(("name", "expected"), [
    ("litellm", ["start", "1", "50", "500", "stop", "start", "1", "50", "500", "stop"]),
    ("gateway-1", ["start", "1", "50", "stop", "start", "500", "stop", "start", "1", "50", "stop", "start", "500",
                   "stop"]),
])
def test_a_target_is_fresh_after_a_crowded_cell_and_a_gateway_before_one(monkeypatch, tmp_path, name, expected):
    from bench import run
    from bench.targets import Target

    log: list[str] = []

    def start(target_name, workdir, mock):
        log.append("start")
        return Target(target_name, "http://127.0.0.1:1", FakeServer(log, "target"))

    def measure(target, mock, client, args, body, latency, mode, connections):
        log.append(str(connections))
        return cell(target.name, rps=100, connections=connections, latency=latency)

    monkeypatch.setattr(run, "_start", start)
    monkeypatch.setattr(run, "_measure_load", measure)
    monkeypatch.setattr(run, "run_load", lambda client, load: None)
    monkeypatch.setattr(run, "rss_bytes", lambda pid: 0)
    args = run._parser().parse_args(["--concurrency", "1", "50", "500", "--modes", "json"])
    mock = Target("direct", "http://127.0.0.1:2", FakeServer(log, "mock"))
    run._measure_target(name, mock, "wrk", args, tmp_path)
    assert [entry.split()[0] for entry in log] == expected
    assert "stop mock" not in log


def test_interleaved_rounds_are_numbered_across_pairs(monkeypatch, tmp_path):
    from bench import run
    from bench.targets import Target

    log: list[str] = []
    monkeypatch.setattr(run, "_start", lambda name, workdir, mock: Target(name, "http://127.0.0.1:1",
                                                                          FakeServer(log, name)))
    monkeypatch.setattr(run, "_measure_load", lambda target, mock, client, args, body, latency, mode, connections:
                        cell(target.name, rps=100, connections=connections, latency=latency))
    args = run._parser().parse_args(["--concurrency", "1", "50", "--modes", "json", "--pair-rounds", "3"])
    swept = [cell(name, rps=100, latency=latency, connections=connections)
             for name in ("direct", "gateway-1", "gateway-2") for latency in (0, 50) for connections in (1, 50)]
    mock = Target("direct", "http://127.0.0.1:2", FakeServer(log, "mock"))
    rounds = run._measure_pairs(swept, mock, "wrk", args, tmp_path)
    numbers = [each.pair_round for each in rounds]
    assert sorted(set(numbers)) == list(range(1, 10))  # three pairs of three rounds
    assert all(numbers.count(number) == 2 for number in set(numbers))


def test_the_litellm_ratio_takes_the_gateways_rounds_and_says_so():
    cells = [
        cell("gateway-1", rps=500, latency=50, connections=50),
        cell("litellm", rps=50, latency=50, connections=50),
        *(cell("gateway-1", rps=rps, latency=50, connections=50, pair_round=index)
          for index, rps in enumerate([700, 720, 100], 1)),
    ]
    check = target_check(cells, "throughput vs LiteLLM")
    assert check.value == "14.0 ×"
    assert check.detail == "700 vs 50 req/s; medians of 3 interleaved rounds"


# -- what a gateway's providers counted over a cell ----------------------------------


def test_provider_counts_are_summed_over_the_workers_that_answered_both_times():
    before = {
        11: {"mock": {"ok": 100, "cancelled": 3, "circuit_transitions": 0}},
        12: {"mock": {"ok": 50, "circuit_transitions": 0}},
        13: {"mock": {"ok": 7}},  # not reached afterwards: left out
    }
    after = {
        11: {"mock": {"ok": 150, "cancelled": 3, "circuit_transitions": 1, "circuit_open": 40},
             "other": {"ok": 0}},
        12: {"mock": {"ok": 60, "server_error": 5, "circuit_transitions": 1}},
        14: {"mock": {"ok": 1000}},  # not reached before: left out
    }
    assert counted(before, after) == {
        "mock": {"ok": 60, "circuit_transitions": 2, "circuit_open": 40, "server_error": 5},
    }


def test_a_cell_notes_what_went_wrong_between_the_gateway_and_its_providers():
    healthy = cell("gateway-1", rps=100)
    healthy.provider_counts = {"mock": {"ok": 1000, "cancelled": 50}}
    assert notes(healthy) == []
    broken = cell("gateway-1", rps=100)
    broken.provider_counts = {"mock": {"ok": 2982, "cancelled": 12, "server_error": 5, "circuit_transitions": 1,
                                       "circuit_open": 17085}}
    assert notes(broken) == [
        "gateway's calls to mock: circuit_open 17,085, circuit_transitions 1, server_error 5 (ok 2,982)",
    ]


def test_kept_log_lines_name_files_within_the_checkout():
    from bench import run
    from bench.targets import REPO

    lines = [f'  File "{REPO}/.peers/litellm-venv/lib/python3.11/site-packages/aiohttp/payload.py", line 415',
             "12:00:00 WARNING [req_1] 503 service_unavailable"]
    assert run._within_checkout(lines) == [
        '  File ".peers/litellm-venv/lib/python3.11/site-packages/aiohttp/payload.py", line 415',
        "12:00:00 WARNING [req_1] 503 service_unavailable",
    ]
