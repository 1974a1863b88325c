"""A tiny closed-loop load generator, for where wrk is not installed (CI's smoke test).

::

    python -m bench.loadgen --url URL --connections C --duration S --body-file F [--stream] [--auth KEY]

Same semantics and output as ``bench/wrk.lua`` under wrk: ``C`` connections, each
sending the next request as soon as its answer is read in full, for ``S`` seconds; a
non-200 answer is a ``status`` error, a 200 stream without ``data: [DONE]`` a
``broken_stream``. Prints one ``BENCH_RESULT {...}`` line. It is Python: on two cores
it is a bottleneck long before wrk is, which the benchmark's client-CPU rule reports.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import httpx
import trio

__all__ = ["main"]


async def _generate(args: argparse.Namespace) -> dict[str, object]:
    body = Path(args.body_file).read_bytes()
    headers = {"content-type": "application/json"}
    if args.auth:
        headers["authorization"] = f"Bearer {args.auth}"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)
    started = time.monotonic()
    stop_at = started + args.duration

    async def connection(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            try:
                response = await client.post(args.url, content=body, headers=headers)
            except httpx.TimeoutException:
                errors["timeout"] += 1
                continue
            except httpx.ConnectError:
                errors["connect"] += 1
                continue
            except httpx.TransportError:
                errors["read"] += 1
                continue
            latencies.append(time.monotonic() - sent)
            if response.status_code != 200:
                errors["status"] += 1
            elif args.stream and b"data: [DONE]" not in response.content:
                errors["broken_stream"] += 1

    async with httpx.AsyncClient(limits=limits, timeout=args.timeout, trust_env=False) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(args.connections):
                nursery.start_soon(connection, client)
    duration = time.monotonic() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": round(duration * 1e6),
        "errors": {kind: errors[kind] for kind in ("connect", "read", "write", "timeout", "status", "broken_stream")},
        "p50_us": round(_percentile(latencies, 50) * 1e6),
        "p99_us": round(_percentile(latencies, 99) * 1e6),
        "max_us": round((latencies[-1] if latencies else 0.0) * 1e6),
    }


def _percentile(ordered: list[float], percent: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * percent / 100) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--auth", default="")
    parser.add_argument("--timeout", type=float, default=30.0)
    result = trio.run(_generate, parser.parse_args())
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
