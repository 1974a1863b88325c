"""``python -m bench.profile``: where one gateway worker spends its CPU, under wrk load.

::

    python -m bench.profile [--latency-ms 50] [--connections 50] [--mode json] [--seconds 20]

Starts the mock and a one-worker gateway as ``make bench`` does, loads it with wrk,
and after a few seconds of warm-up samples it with py-spy (``make bench-peers``
installs it in ``.peers/tools-venv``) in ``--gil`` mode: only samples where the
gateway runs Python count, so time spent runnable-but-descheduled inside a socket
call (the mock and wrk share the two cores) is not mistaken for the gateway's own
cost. Prints the hottest functions by own time and by inclusive time, and own time
by layer; ``--raw FILE`` keeps the samples (flamegraph.pl's input format) for a
flame graph.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.clients import WRK_SCRIPT
from bench.targets import REPO, body_for, start_gateway, start_mock

__all__ = ["main", "summarize"]

PY_SPY = REPO / ".peers" / "tools-venv" / "bin" / "py-spy"
WARMUP = 3.0

#: Own time is charged to the first layer whose path fragment a frame's file contains.
LAYERS = (
    ("gateway: upstream transport (providers/pool.py)", "providers/pool.py"),
    ("gateway: actors, adapters (providers/)", "providers/"),
    ("gateway: router, service, app (orchestrator/)", "orchestrator/"),
    ("httpx client", "httpx/"),
    ("httpcore", "httpcore/"),
    ("hypercorn + h11 (HTTP server)", "hypercorn/"),
    ("hypercorn + h11 (HTTP server)", "h11/"),
    ("quart, quart-trio, werkzeug (web framework)", "quart"),
    ("quart, quart-trio, werkzeug (web framework)", "werkzeug/"),
    ("trio (scheduler, sockets, cancel scopes)", "trio/"),
    ("trio (scheduler, sockets, cancel scopes)", "outcome"),
    ("json (orjson)", "orjson"),
    ("logging", "logging/"),
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:]*)(?::\d+)?\)$")


def summarize(raw: str, top: int = 25) -> str:
    """The hottest functions (own and inclusive time) and own time by layer, as text."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = [_name(frame) for frame in stack.split(";")]
        own[frames[-1][0]] += samples
        layers[_layer(frames[-1][1])] += samples
        for name in {name for name, _ in frames}:
            inclusive[name] += samples
    if not total:
        return "no samples"

    def rows(counter: Counter[str], limit: int) -> list[str]:
        return [f"  {100 * count / total:5.1f}%  {name}" for name, count in counter.most_common(limit)]

    return "\n".join([
        f"{total} samples",
        "own time by layer:", *rows(layers, len(layers)),
        f"own time, top {top}:", *rows(own, top),
        f"inclusive time, top {top * 2}:", *rows(inclusive, top * 2),
    ])


def _name(frame: str) -> tuple[str, str]:
    matched = _FRAME.match(frame)
    if matched is None:
        return frame, ""
    return f"{matched['function']} ({matched['file']})", matched["file"]


def _layer(path: str) -> str:
    for layer, fragment in LAYERS:
        if fragment in path:
            return layer
    return "other (stdlib: contextlib, typing, abc, ...)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=int, default=50, choices=[0, 50])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--mode", choices=("json", "stream"), default="json")
    parser.add_argument("--seconds", type=int, default=20, help="sampled seconds (default 20)")
    parser.add_argument("--rate", type=int, default=100, help="samples per second (default 100)")
    parser.add_argument("--raw", type=Path, default=None, metavar="FILE", help="keep the raw samples here")
    args = parser.parse_args(argv)
    if not PY_SPY.exists():
        raise SystemExit("bench.profile: py-spy is not installed: run `make bench-peers`")
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as scratch:
        workdir = Path(scratch)
        output = args.raw or workdir / "samples.txt"
        body = workdir / "body.json"
        body.write_bytes(body_for(args.latency_ms, stream=args.mode == "stream"))
        mock = start_mock(workdir)
        gateway = None
        try:
            gateway = start_gateway(workdir, mock.url, workers=1)
            wrk = subprocess.Popen(
                ["wrk", "--threads", "1", "--connections", str(args.connections), "--duration",
                 f"{args.seconds + 2 * WARMUP:.0f}s", "--script", str(WRK_SCRIPT), gateway.path(args.latency_ms)],
                env={"BENCH_BODY_FILE": str(body), "BENCH_STREAM": "1" if args.mode == "stream" else "0",
                     "PATH": "/usr/bin:/bin"},
                stdout=subprocess.PIPE, text=True,
            )
            time.sleep(WARMUP)
            subprocess.run(
                [str(PY_SPY), "record", "--pid", str(gateway.server.pid), "--duration", str(args.seconds),
                 "--rate", str(args.rate), "--gil", "--format", "raw", "--output", str(output)],
                check=True, capture_output=True,
            )
            result = wrk.communicate()[0]
        finally:
            if gateway is not None:
                gateway.server.stop()
            mock.server.stop()
        print(f"gateway, 1 worker; mock latency {args.latency_ms} ms, {args.mode}, {args.connections} connections;"
              f" {args.seconds} s at {args.rate} Hz" + (f"; raw samples: {args.raw}" if args.raw else ""))
        print(next((line for line in result.splitlines() if line.startswith("BENCH_RESULT")), result.strip()))
        print(summarize(output.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
