"""``make bench`` keeps working: its tiny mode runs end to end (speed is never asserted).

The smoke run starts the mock and the gateway with one and two workers as real
processes, loads each with the built-in generator (CI has no wrk) for a fraction of a
second per cell, prints the table and writes the JSON. What is checked is the shape
and that every request was answered, not how fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_bench_runs_end_to_end_in_smoke_mode(tmp_path):
    output = tmp_path / "bench.json"
    finished = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert finished.returncode == 0, finished.stderr

    result = json.loads(output.read_text())
    cells = [cell for cell in result["cells"] if not cell["pair_round"]]
    rounds = [cell for cell in result["cells"] if cell["pair_round"]]
    # The two-worker target's pairs, json and stream, measured again (the other pairs
    # need 1 and 50 connections, which a smoke run does not measure).
    assert [(cell["target"], cell["latency_ms"], cell["mode"], cell["connections"]) for cell in rounds] == [
        ("gateway-2", 50, "json", 2), ("gateway-1", 50, "json", 2),
        ("gateway-2", 50, "stream", 2), ("gateway-1", 50, "stream", 2),
    ]
    assert {(cell["target"], cell["latency_ms"], cell["mode"]) for cell in cells} == {
        (target, latency, mode)
        for target in ("direct", "gateway-1", "gateway-2")
        for latency in (0, 50)
        for mode in ("json", "stream")
    }
    for cell in cells + rounds:
        assert cell["requests"] > 0, cell
        assert sum(cell["errors"].values()) == 0, cell
        assert cell["processes"] and all(process["cpu_s"] >= 0 for process in cell["processes"])
    for cell in cells:
        if cell["target"] == "gateway-1":  # every answer the client counted, the provider counted
            provider = "mock-d50" if cell["latency_ms"] else "mock"
            assert cell["provider_counts"][provider]["ok"] >= cell["requests"], cell
        assert not cell["logs"] and not any(note.startswith("gateway's calls") for note in cell["notes"]), cell
    two_workers = [cell for cell in cells if cell["target"] == "gateway-2"]
    assert all(len(cell["processes"]) == 3 for cell in two_workers)  # supervisor and two workers
    assert {check["name"] for check in result["targets"]} == {
        "throughput vs direct", "throughput vs LiteLLM", "latency added", "500 in flight",
        "two workers, json", "two workers, stream",
    }
    assert "| mock | mode | conns | target |" in finished.stdout
    for check in result["targets"]:
        if check["name"].startswith("two workers"):
            # Judged on the interleaved round -- unless a 0.3 s cell on a shared machine
            # was refused (noise, say), which the detail then names instead.
            detail = check["detail"]
            assert detail.endswith("medians of 1 interleaved round") or " refused: " in detail, detail


def test_a_cell_with_errors_says_what_the_gateway_counted_and_keeps_the_logs(tmp_path, monkeypatch):
    # A mock that answers every request with a 5xx, behind a gateway that does not
    # retry: its clients get errors at once, its circuit opens after five, and what it
    # counted says so.
    import httpx

    from bench import targets
    from bench.clients import Load
    from bench.run import _measure_cell

    monkeypatch.setattr(targets, "GATEWAY_CONFIG", "[retry]\nmax_attempts = 1\n\n" + targets.GATEWAY_CONFIG)
    mock = targets.start_mock(tmp_path)
    try:
        gateway = targets.start_gateway(tmp_path, mock.url, workers=1)
        try:
            httpx.post(f"{mock.url}/config/failures", json={"server_error_probability": 1.0},
                       trust_env=False).raise_for_status()
            body = tmp_path / "body.json"
            body.write_bytes(targets.body_for(0, stream=False))
            load = Load(gateway.path(0), body, stream=False, connections=1, duration=0.3)
            cell = _measure_cell(gateway, mock, "builtin", load, gateway.server.pids(), 0, "json")
        finally:
            gateway.server.stop()
    finally:
        mock.server.stop()

    assert cell.errors["status"] > 5 and cell.refused
    counts = cell.provider_counts["mock"]
    assert counts["server_error"] == 5 and counts["circuit_transitions"] == 1 and counts["circuit_open"] >= 1
    assert "ok" not in counts
    [note] = [note for note in cell.notes if note.startswith("gateway's calls to mock: ")]
    assert "circuit_open" in note and "server_error 5" in note
    assert set(cell.logs) == {"gateway-1", "mock"}
    # The first lines logged: the five failures, then the circuit opening.
    assert any("circuit for mock" in line for line in cell.logs["gateway-1"][:20])
