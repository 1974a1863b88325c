"""``mock-provider`` / ``python -m mock_server``: serve the mock until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from orchestrator import hosting
from orchestrator.exceptiongroups import leaves

from .app import create_app
from .state import MockState

__all__ = ["main"]

#: In-flight responses (a 30 s stall, say) get this long after Ctrl-C, then are cut.
GRACEFUL_TIMEOUT_SECONDS = 1.0


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    state = MockState.create(seed=args.seed, latency_ms=args.latency_ms)
    try:
        hosting.run(
            create_app(state),
            host=args.host,
            port=args.port,
            graceful_timeout=GRACEFUL_TIMEOUT_SECONDS,
        )
    except* OSError as group:
        # Binding failed (port in use, address not ours): say so, without a traceback.
        reasons = "; ".join(str(error) for error in leaves(group))
        raise SystemExit(
            f"mock-provider: cannot serve on {args.host}:{args.port}: {reasons}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mock-provider",
        description="A fake OpenAI and Anthropic API that breaks on command.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8001, help="port to bind, 0 for any (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the fault generators (default: random)"
    )
    parser.add_argument(
        "--latency-ms",
        type=_non_negative,
        default=0.0,
        help="latency added to every model response (default: 0)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    return parser


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, not {text}")
    return value
