"""``orchestrator demo``: the seed's five scenarios pass end to end, and a broken set-up fails.

The first test is the acceptance test: the console script, ``--start --fast``, in a subprocess.
The others drive the runner in-process against servers the test started (on free
loopback ports, real time), as the demo does against servers already running: its
verdicts must accept every legitimate outcome of the random scenario 2 and must FAIL
when the gateway does not behave as the guide says.
"""

from __future__ import annotations

import gc
import io
import os
import re
import sys
from pathlib import Path

import pytest
import trio
from rich.console import Console

from gateway_fixtures import demo_config, start_gateway
from orchestrator.cli import main
from orchestrator.config import Deployment, RetryPolicy, Route
from orchestrator.demo import DemoOptions, run_demo

ORCHESTRATOR = Path(sys.executable).parent / "orchestrator"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def verdicts(output: str) -> dict[int, str]:
    """Scenario number -> PASS or FAIL, from the verdict lines."""
    return {int(number): word for word, number in re.findall(r"^(PASS|FAIL)  scenario (\d):", output, re.M)}


async def test_start_fast_passes_all_five_scenarios():
    env = {key: value for key, value in os.environ.items() if key != "FORCE_COLOR"}
    with trio.fail_after(60):
        done = await trio.run_process(
            [str(ORCHESTRATOR), "demo", "--start", "--fast"],
            capture_stdout=True, capture_stderr=True, check=False, env=env,
        )
    output = ANSI.sub("", done.stdout.decode())
    assert done.returncode == 0, output + done.stderr.decode()
    assert verdicts(output) == {1: "PASS", 2: "PASS", 3: "PASS", 4: "PASS", 5: "PASS"}
    assert "5 of 5 scenarios passed" in output
    # The narration shows the gateway's own log lines, captured in-process.
    assert "circuit for openai OPENED after 5 consecutive failures" in output
    assert "failover openai -> anthropic: rate_limit" in output


async def demo(mock_url: str, gateway_url: str, *scenarios: int, seed: int | None = None):
    """Run the demo in-process against these servers; return (results, printed text)."""
    out = io.StringIO()
    options = DemoOptions(mock_url=mock_url, gateway_url=gateway_url, fast=True, seed=seed, scenarios=scenarios)
    with trio.fail_after(30):
        results = await run_demo(options, Console(file=out, width=200))
    return results, out.getvalue()


@pytest.fixture
def no_full_collections():
    """Keep the garbage collector from pausing a real-clock measurement.

    These tests time backoff waits from outside, polling every 10 ms in the process that
    also runs the mock and the gateway. Late in the suite that process holds every
    earlier test's leftovers, and a full collection over them can stall it long enough
    to misdate an attempt; frozen, those objects are no longer scanned.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.parametrize(
    "seed, path",
    [
        (0, "openai: ok"),
        (11, "openai: timeout -> ok"),
        (1, "openai: timeout -> timeout -> ok"),
        (3, "openai: timeout -> timeout -> timeout, failover -> anthropic: 1 request (ok 1)"),
    ],
)
async def test_scenario_2_accepts_every_legitimate_outcome(
    mock_server_url, nursery, seed, path, no_full_collections
):
    # A backoff long enough to measure from outside (the runner polls the mock's /stats).
    gateway_url = await start_gateway(nursery, demo_config(mock_server_url, backoff=0.2))
    [result], output = await demo(mock_server_url, gateway_url, 2, seed=seed)
    assert result.passed, output
    checks = {check.claim: check.observed for check in result.checks}
    assert checks["every timeout was retried; failover only after the last"] == path
    waits = [float(wait) for wait in re.findall(r"([\d.]+) s", checks["the waits grow"])]
    assert len(waits) == path.count("timeout -> ")
    for number, wait in enumerate(waits):
        # 0.2 s, then 0.4 s, each with up to 25% jitter, seen from outside to within a few polls.
        assert 0.2 * 2**number - 0.05 <= wait <= 0.25 * 2**number + 0.1, output


async def test_every_scenario_passes_against_running_servers(mock_server_url, nursery, no_full_collections):
    gateway_url = await start_gateway(nursery, demo_config(mock_server_url, backoff=0.2))
    results, output = await demo(mock_server_url, gateway_url, 1, 2, 3, 4, 5)
    assert verdicts(output) == {1: "PASS", 2: "PASS", 3: "PASS", 4: "PASS", 5: "PASS"}, output
    assert [result.number for result in results] == [1, 2, 3, 4, 5]
    # Without the gateway in-process there are no log lines, only where to find them.
    assert "in the gateway's terminal, the lines tagged [req_" in output


async def test_a_gateway_without_anthropic_fails_scenario_4(mock_server_url, nursery):
    openai_only = (Route("gpt-*", (Deployment("openai"),)),)
    gateway_url = await start_gateway(nursery, demo_config(mock_server_url, backoff=0.05, routes=openai_only))
    results, output = await demo(mock_server_url, gateway_url, 1, 4)
    assert verdicts(output) == {1: "PASS", 4: "FAIL"}, output
    failed = {check.claim: check.observed for check in results[1].checks if not check.passed}
    assert "all 7 answered 200 by anthropic" in failed
    assert failed["all 7 answered 200 by anthropic"] == "7 x 502 from openai"
    assert "once open, openai gets nothing: a follow-up goes straight to anthropic" in failed
    assert "1 of 2 scenarios passed; FAILED: scenario 4" in output


async def test_a_gateway_that_does_not_retry_fails_scenario_2(mock_server_url, nursery):
    # One attempt per provider: the first timeout fails over at once, unretried.
    config = demo_config(mock_server_url, retry=RetryPolicy(max_attempts=1))
    gateway_url = await start_gateway(nursery, config)
    [result], output = await demo(mock_server_url, gateway_url, 2, seed=1)
    assert not result.passed, output
    failed = {check.claim: check.observed for check in result.checks if not check.passed}
    assert failed == {
        "every timeout was retried; failover only after the last":
            "openai: timeout, failover -> anthropic: 1 request (ok 1)",
    }


def test_unreachable_servers_exit_1_with_a_hint(capsys):
    status = main(["demo", "--mock-url", "http://127.0.0.1:1", "--gateway-url", "http://127.0.0.1:1"])
    assert status == 1
    error = capsys.readouterr().err
    assert "cannot reach the mock provider at http://127.0.0.1:1" in error
    assert "orchestrator demo --start" in error


def test_start_refuses_urls_of_running_servers(capsys):
    assert main(["demo", "--start", "--gateway-url", "http://127.0.0.1:8080"]) == 2
    assert "--start serves its own mock and gateway" in capsys.readouterr().err
