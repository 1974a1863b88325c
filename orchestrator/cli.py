"""``orchestrator``: the gateway's command line.

::

    orchestrator serve [--config FILE] [--host H] [--port 8080] [--workers N] [--log-format text|json]
    orchestrator load  [--bursts N --concurrency C | --rate R --duration S] ...
    orchestrator demo  [--start] [--fast]
    python -m orchestrator ...          (same; ``serve`` is the default command)

``load`` and ``demo`` live in their own modules (``orchestrator.load``,
``orchestrator.demo``), each with ``add_arguments(parser)`` and ``run(args) -> int``;
they are imported only when used.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator.config import Config, ConfigError
from orchestrator.exceptiongroups import leaves
from orchestrator.logs import configure

__all__ = ["main"]

import importlib

#: Commands served by a module of their own: name -> (module, help).
TOOL_COMMANDS = {
    "load": ("orchestrator.load", "fire bursts of concurrent requests at a gateway and report"),
    "demo": ("orchestrator.demo", "run the seed's five demo scenarios and check each one"),
}
COMMANDS = ("serve", *TOOL_COMMANDS)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; a tool command's own arguments are added only when it is ``command``."""
    parser = argparse.ArgumentParser(prog="orchestrator", description="A resilient OpenAI-compatible LLM gateway.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the gateway over HTTP (the default command)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration (default: the built-in demo set-up)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument("--workers", type=_positive, default=1, metavar="N",
                       help="worker processes serving the same port (default 1). Each is a whole gateway with"
                            " its own provider actors, circuit breakers, limits and statistics: they share"
                            " nothing but the port, so a provider's failures trip each worker's breaker"
                            " separately and /health shows the worker that answered")
    serve.add_argument("--with-mock", action="store_true",
                       help="also serve the mock provider in the same process (what make run does)")
    serve.add_argument("--mock-port", type=int, default=8001, help="the mock's port with --with-mock (default 8001)")
    serve.add_argument("--mock-seed", type=int, default=None, help="seed of the mock's fault generators")
    for name, (module, help_text) in TOOL_COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "serve")
    args = build_parser(args_list[0]).parse_args(args_list)
    if args.command == "serve":
        return _serve(args)
    module, _ = TOOL_COMMANDS[args.command]
    return int(importlib.import_module(module).run(args))


def _serve(args: argparse.Namespace) -> int:
    configure(log_format=args.log_format, level=args.log_level)
    try:
        if args.config:
            config = Config.from_toml(args.config)
        elif args.with_mock:  # the built-in set-up, pointed at the mock this run serves
            config = Config.default(mock_url=f"http://{args.host}:{args.mock_port}")
        else:
            config = Config.default()
    except ConfigError as error:
        print(f"orchestrator: invalid configuration: {error}", file=sys.stderr)
        return 2
    from orchestrator.server import run_gateway

    failures: list[BaseException] = []
    status = 0
    try:
        status = run_gateway(
            config,
            host=args.host,
            port=args.port,
            workers=args.workers,
            mock_port=args.mock_port if args.with_mock else None,
            mock_seed=args.mock_seed,
        )
    except* KeyboardInterrupt:
        pass
    except* OSError as group:
        failures = list(leaves(group))
    if failures:
        # Binding failed (port in use, address not ours): say so, without a traceback.
        reasons = "; ".join(sorted({str(error) for error in failures}))
        print(f"orchestrator: cannot serve on {args.host}: {reasons}", file=sys.stderr)
        return 1
    return status


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value
