"""The load script against a real gateway and mock on loopback sockets.

The mock and the gateway run in the test's own trio run on free ports (real time: no
MockClock with sockets), and ``run_load`` runs in-process; two runs go through the
``orchestrator`` console script to prove the command line end to end. Every run must
reconcile: sent = answered + lost, the per-burst numbers add up to the total, and the
attempts counted from the gateway's headers equal the requests the mock received,
with faults injected so that the reconciliation is not trivial.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import orjson
import pytest
import trio

from gateway_fixtures import demo_config, start_gateway
from mock_server.faults import FaultProfile
from orchestrator import cli
from orchestrator.load import LoadOptions, Planner, run_load
from orchestrator.loadreport import LoadReport, Percentiles, Summary

#: OpenAI rate limits (a failover at once) and server errors (retries, then failover);
#: Anthropic's own server errors make some requests fail for good.
FLAKY_OPENAI = FaultProfile(rate_limit_probability=0.3, server_error_probability=0.2)
FLAKY_ANTHROPIC = FaultProfile(server_error_probability=0.1)


@pytest.fixture
async def gateway_url(mock_server_url, nursery):
    return await start_gateway(nursery, demo_config(mock_server_url, backoff=0.05))


@pytest.fixture
def flaky(mock_state):
    mock_state.configure(FLAKY_OPENAI, "openai")
    mock_state.configure(FLAKY_ANTHROPIC, "anthropic")


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (a port just freed by the kernel)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_reconciles(report: LoadReport, *, headers_match_mock: bool = True) -> None:
    total = report.total
    assert total.sent == total.answered + total.lost
    assert sum(total.status.values()) == total.answered
    assert sum(total.provider.values()) == total.answered
    assert sum(total.outcomes.values()) == total.answered
    assert sum(total.errors.values()) == total.outcomes["error"]
    assert sum(total.stream_errors.values()) == total.outcomes["stream_error"]
    assert sum(total.lost_by_reason.values()) == total.lost
    assert total.attempts.missing == 0
    assert total.attempts.total == sum(n * count for n, count in total.attempts.distribution.items())
    if report.bursts:
        for field in ("sent", "answered", "lost", "streamed", "retried", "failovers"):
            assert sum(getattr(burst, field) for burst in report.bursts) == getattr(total, field), field
        assert sum(burst.attempts.total for burst in report.bursts) == total.attempts.total
    if report.schedule is not None:
        assert report.schedule.sent == total.sent
        assert report.schedule.planned == total.sent + report.schedule.not_sent
    upstream = report.upstream
    assert upstream is not None and upstream.sent == total.sent
    if headers_match_mock:
        assert upstream.total == upstream.header_attempts == total.attempts.total


async def load(gateway_url: str, mock_url: str | None, **options) -> LoadReport:
    mode = LoadOptions.for_rate if "rate" in options else LoadOptions.for_bursts
    return await run_load(mode(url=gateway_url, mock_url=mock_url, seed=options.pop("seed", 7), **options))


async def test_healthy_bursts_reconcile_exactly(gateway_url, mock_server_url):
    report = await load(gateway_url, mock_server_url, bursts=3, concurrency=8, interval=0.05)
    assert_reconciles(report)
    total = report.total
    assert (total.sent, total.answered, total.lost) == (24, 24, 0)
    assert total.status == {200: 24} and total.provider == {"openai": 24}
    assert total.outcomes == {"ok": 24, "error": 0, "stream_error": 0, "truncated": 0}
    assert total.attempts.distribution == {1: 24} and total.attempts.mean == 1.0
    assert (total.retried, total.failovers) == (0, 0)
    assert report.primary_provider == "openai"
    assert [burst.sent for burst in report.bursts] == [8, 8, 8]
    assert report.upstream.requests == {"openai": 24, "anthropic": 0}
    assert report.upstream.per_request == 1.0
    latency = total.latency
    assert 0 < latency.p50 <= latency.p90 <= latency.p99 <= latency.max
    assert total.throughput > 0 and report.exit_status == 0


@pytest.mark.parametrize("stream", [0.0, 1.0, 0.5], ids=["json", "streamed", "mixed"])
async def test_bursts_with_failures_reconcile(gateway_url, mock_server_url, flaky, stream):
    report = await load(gateway_url, mock_server_url, bursts=3, concurrency=10, interval=0, stream=stream)
    assert_reconciles(report)
    total = report.total
    assert total.lost == 0 and total.outcomes["truncated"] == 0
    assert total.streamed == {0.0: 0, 1.0: 30}.get(stream, total.streamed)
    if stream == 0.5:
        assert 0 < total.streamed < 30
    # The faults show: some answers came from anthropic, some after more than one attempt.
    assert total.failovers > 0 and total.provider.get("anthropic", 0) == total.failovers
    assert report.upstream.outcomes["openai"].get("rate_limit", 0) > 0
    assert report.upstream.total > total.sent
    assert report.exit_status == 0


@pytest.mark.parametrize("stream", [0.0, 1.0], ids=["json", "streamed"])
async def test_open_loop_with_failures_reconciles(gateway_url, mock_server_url, flaky, stream):
    report = await load(gateway_url, mock_server_url, rate=100, duration=0.3, stream=stream)
    assert_reconciles(report)
    assert report.mode == "rate" and report.bursts == ()
    assert report.schedule.planned == 30 and report.schedule.not_sent == 0
    assert report.total.lost == 0 and report.total.failovers > 0
    # Lag is measured, never negative (no request starts before it is due); how much
    # there is depends on the machine, so no bound is asserted here.
    assert 0 <= report.schedule.lag.p50 <= report.schedule.lag.max


async def test_open_loop_does_not_queue_beyond_its_cap(gateway_url, mock_server_url, mock_state):
    mock_state.configure(FaultProfile(latency_ms=300), "all")
    report = await load(gateway_url, mock_server_url, rate=100, duration=0.2, concurrency=3)
    assert_reconciles(report)
    schedule = report.schedule
    # Three in flight for 300 ms while 20 fall due within 200 ms: the rest are not sent
    # (a slot frees only if the sender fell far behind), and none waits for a slot, which
    # would make the sender closed-loop.
    assert 3 <= schedule.sent < 10 and schedule.not_sent == 20 - schedule.sent
    assert report.total.answered == schedule.sent


async def test_mid_stream_failures_are_error_events_never_truncation(gateway_url, mock_server_url, mock_state):
    # Every stream is cut after two chunks, on both providers: the gateway continues on
    # anthropic (prefill), which is cut too, so each stream ends with an error event.
    mock_state.configure(FaultProfile(stream_cut_probability=1.0), "all")
    report = await load(gateway_url, mock_server_url, bursts=1, concurrency=6, interval=0, stream=1.0)
    # Continuations happen after the headers were sent: the mock saw more than the headers say.
    assert_reconciles(report, headers_match_mock=False)
    total = report.total
    assert total.outcomes == {"ok": 0, "error": 0, "stream_error": 6, "truncated": 0}
    assert total.stream_errors == {"stream_interrupted": 6} and total.errors == {}
    assert report.upstream.total > report.upstream.header_attempts == total.attempts.total
    assert report.exit_status == 0


async def test_client_timeouts_are_lost_before_the_answer_and_truncated_after(gateway_url, mock_server_url,
                                                                               mock_state):
    mock_state.configure(FaultProfile(latency_ms=2000), "all")
    silent = await load(gateway_url, None, bursts=1, concurrency=3, interval=0, timeout=0.2)
    assert silent.total.lost == 3 and silent.total.lost_by_reason == {"timeout": 3}
    assert silent.total.latency == Percentiles() and silent.exit_status == 1

    mock_state.configure(FaultProfile(chunk_delay_ms=200), "all")
    slow = await load(gateway_url, None, bursts=1, concurrency=3, interval=0, timeout=0.5, stream=1.0)
    assert slow.total.answered == 3 and slow.total.status == {200: 3}
    assert slow.total.truncated == {"timeout": 3} and slow.exit_status == 1


async def test_a_closed_port_loses_everything():
    report = await load(closed_port_url(), None, bursts=2, concurrency=3, interval=0)
    total = report.total
    assert (total.sent, total.answered, total.lost) == (6, 0, 6)
    assert total.lost_by_reason == {"connect_error": 6}
    assert report.primary_provider is None and total.failovers is None
    assert total.throughput == 0 and total.attempts.mean is None
    assert report.exit_status == 1


async def test_json_report_field_by_field(gateway_url, mock_server_url, flaky):
    report = await load(gateway_url, mock_server_url, bursts=2, concurrency=5, interval=0, stream=0.5, seed=11)
    data = orjson.loads(orjson.dumps(report.to_json()))
    assert list(data) == ["version", "gateway", "mode", "parameters", "started_at", "primary_provider",
                          "total", "bursts", "schedule", "upstream"]
    assert data["version"] == 1 and data["gateway"] == gateway_url and data["mode"] == "bursts"
    assert type(data["parameters"]["interval_s"]) is float and type(data["parameters"]["stream"]) is float
    assert data["parameters"] == {"bursts": 2, "concurrency": 5, "interval_s": 0, "rate": None, "duration_s": None,
                                  "model": "gpt-4", "stream": 0.5, "timeout_s": 90.0, "seed": 11}
    assert data["started_at"].endswith("Z") and data["primary_provider"] == "openai"
    assert data["schedule"] is None
    total = data["total"]
    check_summary_json(total)
    assert total["sent"] == 10 and total["lost"] == 0
    assert [burst["burst"] for burst in data["bursts"]] == [1, 2]
    for burst in data["bursts"]:
        check_summary_json(burst)
        assert burst["sent"] == 5
    assert sum(burst["answered"] for burst in data["bursts"]) == total["answered"]
    upstream = data["upstream"]
    assert set(upstream) == {"mock_url", "requests", "outcomes", "disconnects", "total", "per_request",
                             "header_attempts", "header_per_request"}
    assert upstream["mock_url"] == mock_server_url
    assert set(upstream["requests"]) == {"openai", "anthropic"}
    assert upstream["total"] == sum(upstream["requests"].values()) == total["attempts"]["total"]
    assert upstream["header_attempts"] == total["attempts"]["total"]
    assert upstream["per_request"] == upstream["header_per_request"] == round(upstream["total"] / 10, 4)
    for name, kinds in upstream["outcomes"].items():
        assert sum(kinds.values()) == upstream["requests"][name]


def check_summary_json(summary: dict) -> None:
    assert set(summary) == {
        "sent", "answered", "lost", "streamed", "wall_s", "throughput_per_s", "status", "provider", "outcomes",
        "attempts", "retried", "failovers", "latency_ms", "errors", "stream_errors", "truncated", "lost_by_reason",
    } | ({"burst"} if "burst" in summary else set())
    for field in ("sent", "answered", "lost", "streamed", "retried", "failovers"):
        assert type(summary[field]) is int, field
    assert summary["sent"] == summary["answered"] + summary["lost"]
    assert isinstance(summary["wall_s"], float) and summary["wall_s"] > 0
    assert summary["throughput_per_s"] == pytest.approx(summary["answered"] / summary["wall_s"], rel=1e-3)
    assert all(status.isdigit() for status in summary["status"])
    assert sum(summary["status"].values()) == summary["answered"]
    assert sum(summary["provider"].values()) == summary["answered"]
    assert list(summary["outcomes"]) == ["ok", "error", "stream_error", "truncated"]
    assert sum(summary["outcomes"].values()) == summary["answered"]
    assert sum(summary["errors"].values()) == summary["outcomes"]["error"]
    assert sum(summary["stream_errors"].values()) == summary["outcomes"]["stream_error"]
    assert sum(summary["truncated"].values()) == summary["outcomes"]["truncated"]
    assert sum(summary["lost_by_reason"].values()) == summary["lost"]
    attempts = summary["attempts"]
    assert set(attempts) == {"distribution", "total", "mean", "missing"}
    assert sum(attempts["distribution"].values()) == summary["answered"] - attempts["missing"]
    assert attempts["total"] == sum(int(n) * count for n, count in attempts["distribution"].items())
    assert attempts["mean"] == pytest.approx(attempts["total"] / summary["answered"], abs=1e-4)
    latency = summary["latency_ms"]
    assert list(latency) == ["p50", "p90", "p99", "max"]
    assert all(isinstance(value, float) for value in latency.values())
    assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"] <= summary["wall_s"] * 1000 + 0.001


def orchestrator_command() -> str:
    return str(Path(sys.executable).parent / "orchestrator")


async def test_the_command_line_end_to_end(gateway_url, mock_server_url, tmp_path):
    report_path = tmp_path / "report.json"
    done = await trio.run_process(
        [orchestrator_command(), "load", "--url", gateway_url, "--mock-url", mock_server_url, "--bursts", "2",
         "--concurrency", "4", "--interval", "0", "--stream", "--seed", "5", "--json", str(report_path)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    assert "2 bursts of 4" in text and "sent          8 = 8 answered + 0 lost" in text
    assert "burst 2/2: 4 sent" in done.stderr.decode()  # plain progress lines: not a terminal
    data = orjson.loads(report_path.read_bytes())
    assert data["parameters"]["seed"] == 5 and data["total"]["streamed"] == 8
    assert data["total"]["outcomes"]["ok"] == 8 and data["upstream"]["total"] == 8

    lost = await trio.run_process(
        [orchestrator_command(), "load", "--url", closed_port_url(), "--bursts", "1", "--concurrency", "2",
         "--json", "-"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert lost.returncode == 1
    assert orjson.loads(lost.stdout)["total"]["lost_by_reason"] == {"connect_error": 2}
    assert "2 = 0 answered + 2 lost" in lost.stderr.decode()  # the text report moved to stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rate", "5", "--bursts", "2"], "choose one mode"),
        (["--duration", "3"], "--duration needs --rate"),
        (["--interval", "1", "--duration", "2", "--rate", "3"], "choose one mode"),
        (["--rate", "0.1", "--duration", "1"], "plans no request"),
        (["--stream", "1.5"], "--stream"),
        (["--bursts", "0"], "--bursts"),
        (["--url", "localhost:8080"], "--url"),
    ],
)
def test_contradictory_or_invalid_flags_are_refused(argv, message, capsys):
    assert cli.main(["load", *argv]) == 2
    assert message in capsys.readouterr().err


def test_options_from_arguments_take_each_modes_defaults():
    parse = cli.build_parser("load").parse_args
    bursts = LoadOptions.from_args(parse(["load", "--seed", "3"]))
    assert (bursts.mode, bursts.bursts, bursts.concurrency, bursts.interval, bursts.seed) == ("bursts", 5, 10, 1.0, 3)
    rate = LoadOptions.from_args(parse(["load", "--rate", "20", "--stream", "0.25"]))
    assert (rate.mode, rate.rate, rate.duration, rate.concurrency, rate.stream) == ("rate", 20, 10.0, 256, 0.25)
    assert rate.planned == 200 and rate.bursts is None


def test_a_seed_fixes_what_each_request_asks_and_whether_it_streams():
    def plans(seed: int) -> list[tuple[bool, bytes]]:
        planner = Planner(LoadOptions.for_bursts(stream=0.5, seed=seed))
        return [(plan.stream, plan.body) for plan in (planner.next(1) for _ in range(40))]

    assert plans(1) == plans(1) != plans(2)
    assert 0 < sum(stream for stream, _ in plans(1)) < 40
    assert all(orjson.loads(body).get("stream", False) is stream for stream, body in plans(1))


def test_percentiles_are_nearest_rank():
    sample = Percentiles.of_seconds([i / 1000 for i in range(100, 0, -1)])  # 1..100 ms
    assert (sample.p50, sample.p90, sample.p99, sample.max) == pytest.approx((50, 90, 99, 100))
    assert Percentiles.of_seconds([0.007]) == Percentiles(7.0, 7.0, 7.0, 7.0)
    assert Summary.of([], primary="openai").latency == Percentiles()


async def test_an_api_key_reaches_a_gateway_that_needs_one(mock_server_url, nursery):
    import attrs

    config = attrs.evolve(demo_config(mock_server_url), client_keys=("sk-load-test-key",))
    url = await start_gateway(nursery, config)
    without = await load(url, None, bursts=1, concurrency=2, interval=0)
    assert without.total.status == {401: 2}
    with_key = await load(url, None, bursts=1, concurrency=2, interval=0, api_key="sk-load-test-key")
    assert with_key.total.status == {200: 2}
