"""The load generators: wrk with ``bench/wrk.lua``, or ``bench.loadgen`` without wrk.

Both are closed loop (each connection sends its next request when the previous answer
is complete), run as a child process for one cell, and print one ``BENCH_RESULT`` JSON
line. The child's CPU time comes from ``getrusage(RUSAGE_CHILDREN)`` around its wait:
the servers, the other children, are still running then, so only the client is counted.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Load", "LoadResult", "available_client", "run_load"]

BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "wrk.lua"
#: A request slower than this is a timeout error (LiteLLM at 500 connections needs it).
REQUEST_TIMEOUT = 30


@dataclass(frozen=True)
class Load:
    """One cell's load: where, what, how many connections, how long."""

    url: str
    body_file: Path
    stream: bool
    connections: int
    duration: float
    auth: str = ""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    duration: float
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    client_cpu: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0


def available_client(preferred: str) -> str:
    """``wrk`` or ``builtin``: ``auto`` takes wrk when it is installed."""
    if preferred == "auto":
        return "wrk" if shutil.which("wrk") else "builtin"
    if preferred == "wrk" and not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (make bench-peers installs it from Debian)")
    return preferred


def run_load(client: str, load: Load) -> LoadResult:
    """Run one cell's load to its end (blocks ``load.duration`` seconds and a little)."""
    env = dict(os.environ)
    if client == "wrk":
        env.update(BENCH_BODY_FILE=str(load.body_file), BENCH_AUTH=load.auth, BENCH_STREAM="1" if load.stream else "0")
        argv = [
            "wrk", "--threads", "1", "--connections", str(load.connections),
            "--duration", f"{max(1, round(load.duration))}s", "--timeout", f"{REQUEST_TIMEOUT}s",
            "--script", str(WRK_SCRIPT), load.url,
        ]
    else:
        argv = [
            sys.executable, "-m", "bench.loadgen", "--url", load.url, "--connections", str(load.connections),
            "--duration", str(load.duration), "--body-file", str(load.body_file), "--auth", load.auth,
            "--timeout", str(REQUEST_TIMEOUT),
        ] + (["--stream"] if load.stream else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = subprocess.run(argv, env=env, cwd=BENCH_DIR.parent, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"{client} failed ({finished.returncode}): {finished.stderr.strip() or finished.stdout}")
    data = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    return LoadResult(
        requests=data["requests"],
        duration=data["duration_us"] / 1e6,
        errors=data["errors"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        client_cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )
