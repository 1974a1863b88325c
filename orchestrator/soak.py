"""``make soak`` / ``python -m orchestrator.soak``: a chaos soak of the gateway.

::

    python -m orchestrator.soak [--requests 20000] [--concurrency 64] [--stream 0.5]
        [--fault-rate 0.3] [--mix-interval 5] [--faults KIND,...] [--seed N]
        [--deadline 20] [--timeout S] [--model gpt-4] [--json PATH] [--workdir DIR]
        [--mock-url URL [--gateway-url URL [--gateway-pid PID] [--api-key KEY]]]

Sends ``--requests`` chat completions through the gateway, ``--concurrency`` at a time
for the whole run (each of that many workers sends its next request as soon as its last
one is answered), a seeded ``--stream`` fraction of them streamed, while a chaos task
replaces the mock provider's fault profiles on both personalities every
``--mix-interval`` seconds. Each new *mix* draws, per personality, three to six fault
kinds (of ``--faults``, default all nine of the mock's), random weights and shapes --
stalls above the gateway's idle and first-token timeouts but far below its deadline,
timeouts on both sides of the attempt timeout, short ``Retry-After`` 429s, 5xx, resets,
stream cuts and malformed chunks before and after the commit point, missing ``[DONE]``
-- scaled so that about ``--fault-rate`` of the upstream requests fault. Every mix is
drawn from ``--seed`` and reseeds the mock's own generators, so a seed fixes the mixes
and the requests; which request meets which fault still depends on timing.

**Servers.** By default the soak starts its own mock (``python -m mock_server``) and
gateway (``python -m orchestrator serve --config <workdir>/gateway.toml``) as separate
processes on free loopback ports, so that the gateway's memory can be read from
``/proc/<pid>/status``; it stops both when it ends, however it ends (SIGTERM, then
SIGKILL after the grace period), and keeps their logs and the configuration in
``--workdir`` (default: a new ``/tmp/soak-*``). ``--mock-url`` uses a running mock
(the soak then starts only a gateway in front of it); ``--gateway-url`` (with
``--mock-url``: the mock that gateway calls) uses a running gateway, whose memory is
reported only with ``--gateway-pid`` and whose deadline ``--deadline`` must state.

The soak's gateway configuration (:data:`GATEWAY_CONFIG`) is the demo's routing
(``gpt-*``: openai, then anthropic with prefill) with timeouts short enough that a stall
is detected well inside the deadline: attempt 5 s, first token 2 s, idle 2 s, deadline
20 s; backoff from 0.2 s; breakers that open after 5 failures for 2 s (doubling up to
10 s), so that circuits trip and recover many times in a run instead of staying open.

**Requests.** The load script's machinery (:mod:`orchestrator.load`): its planner
(prompts and stream choices from the seed), its :func:`~orchestrator.load.exchange`
(one request, read to its end, never raising) and its summary, over clients configured
as the load script's -- but one per eight workers rather than one for all: httpcore
scans every connection of its pool on each request, and one pool of 64 made the soak
itself the busiest process on the machine. On top of the load script's classification,
the soak watches the bytes of every answer (a pass-through transport under each
client) and judges each one:

- **complete**: a 200 JSON completion whose choices all have a message and a
  ``finish_reason``, or a 200 event stream of well-formed chunks, one of them with a
  ``finish_reason``, ended by ``data: [DONE]`` and nothing after it -- and in either
  case carrying exactly the mock's reply to the request's prompt (the mock's text is a
  function of the prompt alone, whichever personality answers);
- **well-formed error**: a non-2xx answer whose body is OpenAI's error shape
  (``{"error": {"message", "type", "param", "code"}}``), or a 200 event stream of
  well-formed chunks ended by one ``data: {"error": {...}}`` event in that shape and no
  ``[DONE]``;
- **malformed**: anything else -- including an answer that is complete or a
  well-formed error by its body but whose headers break the gateway's promises -- by
  reason: ``no_done`` (a stream that stops with neither), ``wrong_content`` (complete in form, but not the reply to this prompt:
  another request's answer, or a continuation that repeated or lost text),
  ``done_without_finish_reason``, ``data_after_done``, ``data_after_error``,
  ``invalid_event``, ``invalid_chunk``, ``unshaped_error_event``, ``partial_event``,
  ``incomplete_completion``, ``unshaped_error_<status>``, ``unexpected_status_<status>``,
  ``stream_with_status_<status>``, ``truncated:<why>`` (the body broke off: the
  connection failed or the client's ``--timeout`` passed mid-answer),
  ``request_id_mismatch`` (``x-request-id`` missing or not the id sent),
  ``no_retry_after_<status>`` (a 429 or 503 without ``Retry-After``), or ``unwatched``
  (an answer that bypassed the watch: a bug of the soak itself).

A request with no status line at all is **no response**, by the load script's reasons.

**Checks.** The run passes when: no response is 0; malformed is 0; p99 latency is
below the deadline; the gateway is alive at the end; ``/health`` answers at the end;
the gateway's in-flight counts (its own and every provider's) return to 0 within the
deadline after the last answer; and a gateway the soak started exits 0 when stopped.
Exit status: 0 passed, 1 a check failed, 2 invalid arguments, 3 the soak could not run
(a server did not start, the mock's API did not answer, the JSON file could not be
written), 130 interrupted.

**Report.** Text on stdout (progress and every mix change on stderr), and with
``--json PATH`` (``-``: stdout, the text then goes to stderr) this object; times are
seconds unless the name ends in ``_ms``, memory is bytes::

    {
      "version": 1,
      "started_at": str,                           # ISO 8601 UTC
      "parameters": {"requests": int, "concurrency": int, "stream": float,
                     "fault_rate": float, "mix_interval_s": float, "faults": [str],
                     "seed": int, "deadline_s": float, "timeout_s": float, "model": str},
      "gateway": {"url": str, "pid": int | null, "started": bool,  # started by the soak
                  "config": str | null},           # the TOML it was given, if started
      "mock": {"url": str, "started": bool},
      "workdir": str | null,                       # logs and configuration of started servers
      "requests": {"sent": int, "answered": int, "no_response": int,
                   "complete": int, "well_formed_error": int, "malformed": int},
      "malformed": {reason: int},                  # sums to requests.malformed
      "examples": [{"request_id": str, "verdict": str,  # "malformed:<reason>" or
                    "status": int | null, "stream": bool,  # "no_response:<reason>": at
                    "elapsed_s": float}],          #   most 10 per verdict, in order sent
      "no_response": {reason: int},                # sums to requests.no_response
      "total": SUMMARY,                            # orchestrator.loadreport's SUMMARY
      "upstream": UPSTREAM,                        # orchestrator.loadreport's "upstream"
      "fault_fraction": {"openai": float | null, ...},  # mock answers that were faults
      "latency_ms": PERCENTILES, "deadline_ms": float,
      "latency_ms_by_status": {"200": PERCENTILES, ...},
      "health_ms": PERCENTILES,                    # /health polls during the run
      "breakers": {"openai": {"transitions": int | null, "circuit_at_end": str | null}},
      "memory": null | {"pid": int, "rss_start": int, "rss_warm": int | null,
                        "rss_end": int | null, "peak": int | null,  # VmHWM
                        "samples": [[float, int], ...]},   # [seconds, VmRSS]
      "gateway_cpu_s": float | null,               # user + system, first request to the end
      "soak_cpu_s": float,                         # the soak's own process, while sending
      "mixes": [{"number": int, "at_s": float, "profiles": {"openai": {...}, ...}}],
      "duration_s": float, "throughput_per_s": float | null,
      "end": {"gateway_alive": bool, "health_answered": bool,
              "in_flight": int | null,             # the largest in-flight count left
              "settle_s": float | null,            # last answer to in-flight 0
              "gateway_exit_status": int | null},  # after the soak's SIGTERM
      "checks": [{"name": str, "passed": bool, "detail": str}],
      "passed": bool
    }

``rss_warm`` is the gateway's VmRSS when a tenth of the requests had been answered
(its pools and caches have grown by then): growth from there to ``rss_end`` is the
figure to watch for leaks.

In-process (tests, other trio programs): ``report = await run_soak(SoakOptions(...))``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, TextIO

import attrs
import httpx
import orjson
import trio

from mock_server.conversation import reply_for
from mock_server.faults import DECISION_ORDER, STREAM_ONLY, FaultKind
from orchestrator.load import (
    CHAT_PATH,
    KEEPALIVE_EXPIRY,
    SIDE_REQUEST_TIMEOUT,
    LoadError,
    LoadOptions,
    Planner,
    RequestPlan,
    discover_primary,
    exchange,
    read_mock_stats,
)
from orchestrator.loadreport import Percentiles, Result, Summary, Upstream

__all__ = [
    "GATEWAY_CONFIG",
    "Check",
    "SoakError",
    "SoakOptions",
    "SoakReport",
    "UsageError",
    "Verdict",
    "add_arguments",
    "draw_profile",
    "exit_status_of",
    "gateway_config",
    "judge_answer",
    "judge_headers",
    "judge_run",
    "main",
    "run_soak",
]

JSON_VERSION = 1
MIB = 1024 * 1024
PROVIDERS = ("openai", "anthropic")
DEFAULT_REQUESTS, DEFAULT_CONCURRENCY = 20_000, 64
DEFAULT_STREAM, DEFAULT_FAULT_RATE, DEFAULT_MIX_INTERVAL = 0.5, 0.3, 5.0
DEFAULT_DEADLINE = 20.0
#: The client waits this much longer than the deadline before calling a request lost.
CLIENT_MARGIN = 10.0
#: Progress lines, /health polls and memory samples: this often.
PROGRESS_PERIOD = 5.0
#: Workers per client pool. httpcore scans every connection of a pool on each request
#: (DESIGN section 6): with one pool of 64 the soak's own process was the busiest of the
#: three on the machine, so the workers share several small pools instead.
WORKERS_PER_POOL = 8
#: Failing requests listed in the report, per reason.
EXAMPLES = 10
#: A started server must answer /health within this long.
START_TIMEOUT = 30.0
#: A started server that has not exited this long after SIGTERM (plus its grace) is killed.
STOP_MARGIN = 5.0
#: The soak gateway's provider timeouts (attempt, first token, idle): the mixes place
#: their stalls and delays on both sides of them.
ATTEMPT_TIMEOUT, FIRST_TOKEN_TIMEOUT, IDLE_TIMEOUT = 5.0, 2.0, 2.0
#: Environment variables that would lock the soak out of its own gateway.
KEY_VARIABLES = ("ORCHESTRATOR_CLIENT_KEYS", "ORCHESTRATOR_ADMIN_KEYS")

GATEWAY_CONFIG = """\
# The chaos soak's gateway (orchestrator.soak). Timeouts are short so that a stalled or
# silent provider is detected well inside the deadline, and breakers reopen after
# seconds, not a minute, so that they trip and recover many times in one run.
deadline_seconds = {deadline:g}
seed = {seed}

[retry]
max_attempts = 3
backoff_base_seconds = 0.2
backoff_factor = 2.0
backoff_max_seconds = 2.0
jitter = 0.25
{providers}
[[routes]]
match = "gpt-*"
deployments = [
  {{ provider = "openai" }},
  {{ provider = "anthropic", model = "claude-sonnet-4-5", prefill = true }},
]
"""

PROVIDER_CONFIG = """
[providers.{name}]
kind = "{name}"
base_url = "{base_url}"
api_key = "soak-not-a-secret"
attempt_timeout_seconds = {attempt:g}
connect_timeout_seconds = 2
first_token_timeout_seconds = {first_token:g}
idle_timeout_seconds = {idle:g}
rate_limit_seconds = 1

[providers.{name}.breaker]
failure_threshold = 5
open_seconds = 2
max_open_seconds = 10
"""


class UsageError(ValueError):
    """The arguments contradict each other or are out of range; the message says which."""


class SoakError(Exception):
    """The soak cannot run or cannot finish its report (a server did not start, the
    mock's API did not answer); the message says which."""


# -- options ---------------------------------------------------------------------------


def _fault_kinds(value: Sequence[str | FaultKind] | str) -> tuple[FaultKind, ...]:
    """Fault kinds, as given in-process or as ``--faults timeout,reset``, in the mock's order."""
    if isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    try:
        kinds = {FaultKind(name) for name in value}
    except ValueError:
        known = ", ".join(kind.value for kind in FaultKind)
        raise UsageError(f"--faults takes fault kinds of the mock: {known}") from None
    if not kinds:
        raise UsageError("--faults names no fault kind")
    return tuple(kind for kind in DECISION_ORDER if kind in kinds)


@attrs.frozen
class SoakOptions:
    """One soak, checked; raises :class:`UsageError` for values out of range."""

    requests: int = DEFAULT_REQUESTS
    concurrency: int = DEFAULT_CONCURRENCY
    stream: float = DEFAULT_STREAM
    fault_rate: float = DEFAULT_FAULT_RATE
    mix_interval: float = DEFAULT_MIX_INTERVAL
    faults: tuple[FaultKind, ...] = attrs.field(default=DECISION_ORDER, converter=_fault_kinds)
    seed: int = attrs.field(factory=lambda: random.SystemRandom().randrange(2**31))
    deadline: float = DEFAULT_DEADLINE
    timeout: float | None = None
    model: str = "gpt-4"
    gateway_url: str | None = None
    mock_url: str | None = None
    gateway_pid: int | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    workdir: Path | None = None
    json_path: str | None = None

    def __attrs_post_init__(self) -> None:
        _check(self.requests >= 1, "--requests must be at least 1")
        _check(self.concurrency >= 1, "--concurrency must be at least 1")
        _check(0.0 <= self.stream <= 1.0, "--stream takes a fraction between 0 and 1")
        _check(0.0 <= self.fault_rate <= 0.9, "--fault-rate takes a fraction between 0 and 0.9")
        _check(self.mix_interval > 0, "--mix-interval must be positive")
        _check(self.deadline > 0, "--deadline must be positive")
        _check(self.timeout is None or self.timeout > 0, "--timeout must be positive")
        _check(self.gateway_url is None or self.mock_url is not None,
               "--gateway-url needs --mock-url: the mock that gateway calls, where the faults go")
        _check(self.gateway_pid is None or self.gateway_url is not None,
               "--gateway-pid is for a running gateway given with --gateway-url")
        for name, url in (("--gateway-url", self.gateway_url), ("--mock-url", self.mock_url)):
            _check(url is None or url.startswith(("http://", "https://")), f"{name} must start with http://")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoakOptions:
        given = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "stream": args.stream,
            "fault_rate": args.fault_rate,
            "mix_interval": args.mix_interval,
            "faults": args.faults,
            "seed": args.seed,
            "deadline": args.deadline,
            "timeout": args.timeout,
            "model": args.model,
            "gateway_url": args.gateway_url.rstrip("/") if args.gateway_url else None,
            "mock_url": args.mock_url.rstrip("/") if args.mock_url else None,
            "gateway_pid": args.gateway_pid,
            "api_key": args.api_key or os.environ.get("ORCHESTRATOR_API_KEY"),
            "workdir": args.workdir,
            "json_path": args.json_path,
        }
        return cls(**{name: value for name, value in given.items() if value is not None})

    @property
    def client_timeout(self) -> float:
        """How long the client waits for one whole answer."""
        return self.timeout if self.timeout is not None else self.deadline + CLIENT_MARGIN

    def parameters(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "stream": float(self.stream),
            "fault_rate": float(self.fault_rate),
            "mix_interval_s": float(self.mix_interval),
            "faults": [kind.value for kind in self.faults],
            "seed": self.seed,
            "deadline_s": float(self.deadline),
            "timeout_s": float(self.client_timeout),
            "model": self.model,
        }


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The soak's arguments; left out, each takes :class:`SoakOptions`' default."""
    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=int, metavar="N", help=f"requests to send (default {DEFAULT_REQUESTS})")
    load.add_argument("--concurrency", type=int, metavar="C",
                      help=f"requests in flight throughout (default {DEFAULT_CONCURRENCY})")
    load.add_argument("--stream", type=float, metavar="FRACTION",
                      help=f"seeded fraction of requests streamed (default {DEFAULT_STREAM:g})")
    load.add_argument("--model", help="the model asked for (default gpt-4)")
    load.add_argument("--timeout", type=float, metavar="S",
                      help=f"client-side limit per request (default: the deadline + {CLIENT_MARGIN:g} s)")
    chaos = parser.add_argument_group("chaos")
    chaos.add_argument("--fault-rate", type=float, metavar="F",
                       help=f"fraction of upstream requests that fault (default {DEFAULT_FAULT_RATE:g})")
    chaos.add_argument("--mix-interval", type=float, metavar="S",
                       help=f"seconds between fault mix changes (default {DEFAULT_MIX_INTERVAL:g})")
    chaos.add_argument("--faults", metavar="KIND,...",
                       help="the fault kinds mixes draw from (default: all of the mock's)")
    chaos.add_argument("--seed", type=int, help="seeds requests and mixes (default: drawn, then reported)")
    servers = parser.add_argument_group("servers (default: start a mock and a gateway)")
    servers.add_argument("--mock-url", metavar="URL", help="use this running mock")
    servers.add_argument("--gateway-url", metavar="URL", help="use this running gateway (needs --mock-url)")
    servers.add_argument("--gateway-pid", type=int, metavar="PID", help="the running gateway's pid, for its memory")
    servers.add_argument("--deadline", type=float, metavar="S",
                         help=f"the gateway's deadline; a started gateway gets it (default {DEFAULT_DEADLINE:g})")
    servers.add_argument("--api-key", metavar="KEY",
                         help="sent as 'Authorization: Bearer KEY' (default: $ORCHESTRATOR_API_KEY, else none)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", dest="json_path", metavar="PATH", help="also write the report as JSON ('-': stdout)")
    output.add_argument("--workdir", type=Path, metavar="DIR",
                        help="logs and configuration of started servers (default: a new /tmp/soak-*)")


# -- judging answers -------------------------------------------------------------------


@attrs.frozen
class Verdict:
    """What one answer was: ``complete``, a well-formed ``error``, or ``malformed`` (with
    a reason). See the module docstring for the rules."""

    kind: Literal["complete", "error", "malformed"]
    reason: str | None = None


COMPLETE = Verdict("complete")
WELL_FORMED_ERROR = Verdict("error")


def _malformed(reason: str) -> Verdict:
    return Verdict("malformed", reason)


def judge_answer(
    status: int, content_type: str, body: bytes, *, whole: bool = True, expected: str | None = None
) -> Verdict:
    """Judge one answer from its status, content type and body bytes.

    ``whole`` False means the body did not reach its end (the client stopped reading):
    whatever it holds, it is not a complete answer. ``expected``, when given, is the
    text a complete answer must carry (the mock's reply to the request's prompt): a
    complete answer with other text is ``wrong_content`` -- another request's answer,
    or a continuation that repeated or lost a piece.
    """
    if not whole:
        return _malformed("truncated:body_cut")
    if content_type.startswith("text/event-stream"):
        if status != 200:
            return _malformed(f"stream_with_status_{status}")
        payloads = _data_payloads(body)
        verdict = _judge_events(payloads)
        if verdict is COMPLETE and payloads is not None:
            return _matching(_stream_text(payloads), expected)
        return verdict
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if status == 200:
        if not _is_completion(parsed):
            return _malformed("incomplete_completion")
        return _matching(parsed["choices"][0]["message"].get("content"), expected)
    if status >= 400:
        return WELL_FORMED_ERROR if _is_openai_error(parsed) else _malformed(f"unshaped_error_{status}")
    return _malformed(f"unexpected_status_{status}")


def judge_headers(status: int, headers: Mapping[str, str], request_id: str) -> Verdict | None:
    """What every answer's headers must say (DESIGN section 3): the request's id echoed in
    ``x-request-id``, and, on a 429 or a 503, a ``Retry-After`` in whole seconds. None
    when they say it."""
    if headers.get("x-request-id") != request_id:
        return _malformed("request_id_mismatch")
    if status in (429, 503) and not headers.get("retry-after", "").strip().isdigit():
        return _malformed(f"no_retry_after_{status}")
    return None


def _matching(text: object, expected: str | None) -> Verdict:
    return COMPLETE if expected is None or text == expected else _malformed("wrong_content")


def _stream_text(payloads: list[bytes]) -> str:
    """The content of a complete stream's chunks (already judged well-formed)."""
    pieces = []
    for payload in payloads[:-1]:  # the last is [DONE]
        for choice in orjson.loads(payload)["choices"]:
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                pieces.append(content)
    return "".join(pieces)


def _data_payloads(body: bytes) -> list[bytes] | None:
    """The ``data:`` payloads of an event stream, one per event; None when the last event
    is unfinished (no blank line after it: the stream was cut mid-event)."""
    blocks = body.replace(b"\r\n", b"\n").split(b"\n\n")
    if blocks[-1].strip():
        return None
    payloads = []
    for block in blocks[:-1]:
        data = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            payloads.append(b"\n".join(data))
    return payloads


def _judge_events(payloads: list[bytes] | None) -> Verdict:
    if payloads is None:
        return _malformed("partial_event")
    finished = False
    for index, payload in enumerate(payloads):
        last = index == len(payloads) - 1
        if payload == b"[DONE]":
            if not last:
                return _malformed("data_after_done")
            return COMPLETE if finished else _malformed("done_without_finish_reason")
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return _malformed("invalid_event")
        if not isinstance(event, dict):
            return _malformed("invalid_event")
        if "error" in event:
            if not _is_openai_error(event):
                return _malformed("unshaped_error_event")
            return WELL_FORMED_ERROR if last else _malformed("data_after_error")
        choices = event.get("choices")
        if not isinstance(choices, list):
            return _malformed("invalid_chunk")
        finished = finished or any(isinstance(choice, dict) and choice.get("finish_reason") for choice in choices)
    # Neither [DONE] nor an error event: a silent cut, whatever came before.
    return _malformed("no_done")


def _is_completion(parsed: object) -> bool:
    if not isinstance(parsed, dict):
        return False
    choices = parsed.get("choices")
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(
            isinstance(choice, dict) and isinstance(choice.get("message"), dict) and choice.get("finish_reason")
            for choice in choices
        )
    )


def _is_openai_error(parsed: object) -> bool:
    """OpenAI's error shape: ``{"error": {"message": str, "type": str, "param", "code"}}``."""
    if not isinstance(parsed, dict) or not isinstance(error := parsed.get("error"), dict):
        return False
    return (
        isinstance(error.get("message"), str)
        and bool(error["message"])
        and isinstance(error.get("type"), str)
        and bool(error["type"])
        and "param" in error
        and "code" in error
    )


@attrs.define
class _Watch:
    """The bytes of one answer as the client read them; ``whole`` once the body ended."""

    status: int
    headers: httpx.Headers
    body: bytearray = attrs.Factory(bytearray)
    whole: bool = False

    def verdict(self, request_id: str, expected: str | None) -> Verdict:
        content_type = self.headers.get("content-type", "")
        verdict = judge_answer(self.status, content_type, bytes(self.body), whole=self.whole, expected=expected)
        if verdict.kind == "malformed":  # the body's fault comes first: it says more
            return verdict
        return judge_headers(self.status, self.headers, request_id) or verdict


class _WatchedStream(httpx.AsyncByteStream):
    """A response body passed through unchanged, copied into a :class:`_Watch`."""

    def __init__(self, inner: httpx.AsyncByteStream, watch: _Watch) -> None:
        self._inner = inner
        self._watch = watch

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._watch.body += chunk
            yield chunk
        self._watch.whole = True

    async def aclose(self) -> None:
        await self._inner.aclose()


class _WatchingTransport(httpx.AsyncBaseTransport):
    """Passes every exchange to ``inner``; keeps a :class:`_Watch` of each chat answer,
    keyed by the request's ``x-request-id``, until :meth:`verdict` takes it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self._watches: dict[str, _Watch] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        request_id = request.headers.get("x-request-id")
        if request_id is None or request.url.path != CHAT_PATH:
            return response
        watch = _Watch(response.status_code, response.headers)
        self._watches[request_id] = watch
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_WatchedStream(response.stream, watch),
            extensions=response.extensions,
        )

    def verdict(self, request_id: str, result: Result, *, expected: str | None = None) -> Verdict | None:
        """The verdict on ``result``'s answer (None: no response), forgetting its watch.
        ``expected``: the text a complete answer must carry (see :func:`judge_answer`)."""
        watch = self._watches.pop(request_id, None)
        if result.outcome == "lost":
            return None
        if watch is None:  # answered, but not through this transport: cannot be vouched for
            return _malformed("unwatched")
        if not watch.whole:  # the body broke off: the load script says why
            return _malformed(f"truncated:{result.detail or 'body_cut'}")
        return watch.verdict(request_id, expected)

    async def aclose(self) -> None:
        await self._inner.aclose()


# -- fault mixes -----------------------------------------------------------------------


def draw_profile(
    rng: random.Random, *, rate: float, stream_fraction: float, kinds: Sequence[FaultKind] = DECISION_ORDER
) -> dict[str, Any]:
    """One personality's fault profile for a mix, as a ``/config/failures`` body.

    Draws three to six of ``kinds`` (only those that can strike: no stream faults
    without streams), a weight and a shape for each, then scales the probabilities so
    that the expected fraction of faulting requests, with ``stream_fraction`` of them
    streamed, is ``rate``. Includes a ``seed`` for the mock's generator. The same
    generator state gives the same profile.
    """
    usable = [kind for kind in kinds if stream_fraction > 0 or kind not in STREAM_ONLY]
    body: dict[str, Any] = {"seed": rng.randrange(2**31)}
    if not usable or rate == 0:
        return body
    chosen = sorted(rng.sample(usable, rng.randint(min(3, len(usable)), min(6, len(usable)))),
                    key=DECISION_ORDER.index)
    weights = {kind: rng.uniform(0.5, 1.5) for kind in chosen}
    scale = _scale_for(rate, weights, stream_fraction)
    for kind in chosen:
        body[f"{kind.value}_probability"] = round(min(weights[kind] * scale, 1.0), 4)
    body.update(_shapes(rng, chosen))
    return body


def _shapes(rng: random.Random, chosen: Sequence[FaultKind]) -> dict[str, Any]:
    """How each chosen fault behaves, placed around the soak's own timeouts."""
    shapes: dict[str, Any] = {}
    if FaultKind.TIMEOUT in chosen:
        # Mostly a 504 after a short stall (retried), sometimes silence past the
        # attempt timeout (failed over).
        long = rng.random() < 1 / 3
        shapes["timeout_duration_seconds"] = ATTEMPT_TIMEOUT + 1 if long else round(rng.uniform(0.5, 3.0), 2)
    if FaultKind.RATE_LIMIT in chosen:
        shapes["retry_after_seconds"] = round(rng.uniform(0.2, 1.0), 2)
    if FaultKind.SLOW_FIRST_TOKEN in chosen:
        # Either side of the first-token timeout.
        shapes["first_token_delay_seconds"] = round(rng.uniform(FIRST_TOKEN_TIMEOUT / 2, FIRST_TOKEN_TIMEOUT * 1.5), 2)
    if FaultKind.STREAM_CUT in chosen:
        # 0: before the commit point (an invisible retry); later: mid-answer.
        shapes["stream_cut_after_chunks"] = rng.choice((0, 1, 3, 8))
    if FaultKind.STREAM_STALL in chosen:
        # Either side of the idle timeout, far below the deadline.
        shapes["stream_stall_seconds"] = round(rng.uniform(IDLE_TIMEOUT / 2, IDLE_TIMEOUT * 2), 2)
    if FaultKind.STREAM_STALL in chosen or FaultKind.MALFORMED_CHUNK in chosen:
        shapes["stream_fault_after_chunks"] = rng.choice((0, 1, 4))
    return shapes


def _scale_for(rate: float, weights: Mapping[FaultKind, float], stream_fraction: float) -> float:
    """The factor on ``weights`` that makes the expected fault fraction ``rate`` (or the
    largest possible one, when no factor reaches it). Bisection: the fraction grows
    with the factor."""
    low, high = 0.0, 1.0 / max(weights.values())
    if _expected_rate({kind: weight * high for kind, weight in weights.items()}, stream_fraction) <= rate:
        return high
    for _ in range(60):
        middle = (low + high) / 2
        if _expected_rate({kind: weight * middle for kind, weight in weights.items()}, stream_fraction) < rate:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _expected_rate(probabilities: Mapping[FaultKind, float], stream_fraction: float) -> float:
    """The mock's chance of a fault on a request, averaged over streamed and not: a
    fault strikes when any kind's independent draw falls below its probability."""
    json_clean = math.prod(1 - p for kind, p in probabilities.items() if kind not in STREAM_ONLY)
    stream_clean = json_clean * math.prod(1 - p for kind, p in probabilities.items() if kind in STREAM_ONLY)
    return stream_fraction * (1 - stream_clean) + (1 - stream_fraction) * (1 - json_clean)


@attrs.frozen
class Mix:
    """One change of the mock's faults: when, and each personality's new profile."""

    number: int
    at: float
    profiles: Mapping[str, Mapping[str, Any]]

    def describe(self) -> str:
        parts = [f"{name}: {_describe_profile(profile)}" for name, profile in self.profiles.items()]
        return f"mix {self.number}: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "at_s": round(self.at, 3),
                "profiles": {name: dict(profile) for name, profile in self.profiles.items()}}


def _describe_profile(profile: Mapping[str, Any]) -> str:
    shapes = {
        "timeout": lambda: f"{profile['timeout_duration_seconds']:g} s",
        "rate_limit": lambda: f"retry after {profile['retry_after_seconds']:g} s",
        "slow_first_token": lambda: f"{profile['first_token_delay_seconds']:g} s",
        "stream_cut": lambda: f"after {profile['stream_cut_after_chunks']} chunks",
        "stream_stall": lambda: f"{profile['stream_stall_seconds']:g} s after {profile['stream_fault_after_chunks']}",
        "malformed_chunk": lambda: f"after {profile['stream_fault_after_chunks']}",
    }
    parts = []
    for kind in DECISION_ORDER:
        probability = profile.get(f"{kind.value}_probability")
        if probability:
            shape = shapes.get(kind.value)
            parts.append(f"{kind.value} {probability:.0%}" + (f" ({shape()})" if shape else ""))
    return ", ".join(parts) or "healthy"


# -- servers ---------------------------------------------------------------------------


@attrs.define
class _Server:
    """A server process the soak started, and where its log goes."""

    name: str
    process: trio.Process
    log_path: Path
    grace: float
    exit_status: int | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it outlives its grace period. Shielded: runs to the
        end even when the soak is being cancelled, so nothing is left behind."""
        with trio.CancelScope(shield=True):
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(self.grace + STOP_MARGIN):
                    await self.process.wait()
                if self.process.poll() is None:
                    self.process.kill()
                    await self.process.wait()
            self.exit_status = self.process.returncode


def _free_port() -> int:
    """A loopback TCP port free now, chosen by the kernel (from its high range)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _start_server(
    name: str, argv: list[str], *, url: str, workdir: Path, grace: float, control: httpx.AsyncClient
) -> _Server:
    """Start ``argv`` with its output in ``<workdir>/<name>.log``; return once
    ``<url>/health`` answers 200. Raises :class:`SoakError` (after stopping it) if the
    process exits first or does not answer within :data:`START_TIMEOUT`."""
    log_path = workdir / f"{name}.log"
    env = {key: value for key, value in os.environ.items() if key not in KEY_VARIABLES}
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    server = _Server(name, process, log_path, grace)
    answering = False
    try:
        with trio.move_on_after(START_TIMEOUT):
            while server.alive:
                if await _answers(control, f"{url}/health"):
                    answering = True
                    return server
                await trio.sleep(0.1)
        why = "exited" if not server.alive else f"did not answer within {START_TIMEOUT:g} s"
        raise SoakError(f"the {name} {why}; its log ({log_path}) ends:\n{server.log_tail()}")
    finally:
        if not answering:  # failed or cancelled while starting: do not leave it running
            await server.stop()


async def _answers(control: httpx.AsyncClient, url: str) -> bool:
    with trio.move_on_after(1.0):
        try:
            return (await control.get(url)).status_code == 200
        except httpx.RequestError:
            return False
    return False


def gateway_config(mock_url: str, *, deadline: float, seed: int) -> str:
    """The TOML of the soak's own gateway, calling the mock at ``mock_url``."""
    providers = "".join(
        PROVIDER_CONFIG.format(
            name=name,
            base_url=f"{mock_url}/v1" if name == "openai" else mock_url,
            attempt=ATTEMPT_TIMEOUT,
            first_token=FIRST_TOKEN_TIMEOUT,
            idle=IDLE_TIMEOUT,
        )
        for name in PROVIDERS
    )
    return GATEWAY_CONFIG.format(deadline=deadline, seed=seed, providers=providers)


@attrs.define
class _Servers:
    """The mock and the gateway under test: started by the soak, or given."""

    mock_url: str
    gateway_url: str
    gateway_pid: int | None
    config: str | None = None
    mock: _Server | None = None
    gateway: _Server | None = None

    def gateway_alive(self) -> bool:
        if self.gateway is not None:
            return self.gateway.alive
        if self.gateway_pid is not None:
            return Path(f"/proc/{self.gateway_pid}").exists()
        return True  # not ours to watch: /health at the end speaks for it


@contextlib.asynccontextmanager
async def _open_servers(
    options: SoakOptions, workdir: Path | None, control: httpx.AsyncClient
) -> AsyncIterator[_Servers]:
    """Start what the options do not give (the mock, the gateway), with their logs in
    ``workdir`` (given whenever there is something to start); stop it on exit, however
    the block ends (the gateway first: it calls the mock)."""
    mock = gateway = None
    try:
        mock_url = options.mock_url
        if mock_url is None:
            assert workdir is not None
            port = _free_port()
            mock_url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "mock_server", "--port", str(port), "--log-level", "warning",
                    "--seed", str(options.seed)]
            mock = await _start_server("mock", argv, url=mock_url, workdir=workdir, grace=1.0, control=control)
        servers = _Servers(mock_url, options.gateway_url or "", options.gateway_pid, mock=mock)
        if options.gateway_url is None:
            assert workdir is not None
            servers.config = gateway_config(mock_url, deadline=options.deadline, seed=options.seed)
            config_path = workdir / "gateway.toml"
            config_path.write_text(servers.config)
            port = _free_port()
            servers.gateway_url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "orchestrator", "serve", "--config", str(config_path),
                    "--port", str(port), "--log-level", "WARNING"]
            gateway = await _start_server("gateway", argv, url=servers.gateway_url, workdir=workdir,
                                          grace=options.deadline + 1, control=control)
            servers.gateway, servers.gateway_pid = gateway, gateway.process.pid
        yield servers
    finally:
        for server in (gateway, mock):
            if server is not None:
                await server.stop()


# -- memory, CPU and health ------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """User + system CPU time of this process (the soak's clients) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes; empty when it is gone."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return found


@attrs.frozen
class Memory:
    """The gateway's resident memory over the run, in bytes."""

    pid: int
    rss_start: int
    rss_warm: int | None
    rss_end: int | None
    peak: int | None
    samples: tuple[tuple[float, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "rss_start": self.rss_start,
            "rss_warm": self.rss_warm,
            "rss_end": self.rss_end,
            "peak": self.peak,
            "samples": [[round(at, 3), rss] for at, rss in self.samples],
        }


@attrs.frozen
class Breaker:
    """One provider's circuit breaker over the run, from ``/health``."""

    transitions: int | None
    circuit_at_end: str | None

    @classmethod
    def between(cls, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, name: str) -> Breaker:
        first, last = _provider_health(before, name), _provider_health(after, name)
        counts = first.get("circuit_transitions"), last.get("circuit_transitions")
        transitions = counts[1] - counts[0] if all(isinstance(count, int) for count in counts) else None
        circuit = last.get("circuit")
        return cls(transitions, circuit if isinstance(circuit, str) else None)


def _provider_health(health: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    providers = (health or {}).get("providers")
    provider = providers.get(name) if isinstance(providers, dict) else None
    return provider if isinstance(provider, dict) else {}


def _in_flight(health: Mapping[str, Any] | None) -> int | None:
    """The largest in-flight count ``/health`` shows: the gateway's own or a provider's.
    None when it shows none (not this gateway's ``/health``)."""
    counts = [(health or {}).get("in_flight")]
    counts += [_provider_health(health, name).get("in_flight") for name in PROVIDERS]
    numbers = [count for count in counts if isinstance(count, int)]
    return max(numbers) if numbers else None


async def _read_health(control: httpx.AsyncClient, gateway_url: str) -> tuple[dict[str, Any] | None, float]:
    """The gateway's ``/health`` body (None when it did not answer 200 with JSON in
    time) and how long it took, in seconds."""
    started = trio.current_time()
    with trio.move_on_after(SIDE_REQUEST_TIMEOUT):
        try:
            response = await control.get(f"{gateway_url}/health")
            body = response.json() if response.status_code == 200 else None
        except (httpx.RequestError, ValueError):
            body = None
        return (body if isinstance(body, dict) else None), trio.current_time() - started
    return None, trio.current_time() - started


# -- the run ---------------------------------------------------------------------------


@attrs.define
class _Tally:
    """Counts so far, for progress lines; written by the workers only."""

    planned: int
    sent: int = 0
    answered: int = 0
    no_response: int = 0
    malformed: int = 0


@attrs.frozen
class _Answer:
    """One request's result (the load script's) and the soak's verdict (None: no response)."""

    request_id: str
    result: Result
    verdict: Verdict | None


@attrs.frozen
class Example:
    """A request that failed a check, to look up in the gateway's log by its id."""

    request_id: str
    verdict: str  # "no_response:<reason>" or "malformed:<reason>"
    status: int | None
    stream: bool
    elapsed: float

    @classmethod
    def of(cls, answer: _Answer) -> Example:
        result, verdict = answer.result, answer.verdict
        what = f"no_response:{result.detail}" if verdict is None else f"malformed:{verdict.reason}"
        return cls(answer.request_id, what, result.status, result.stream, result.elapsed)

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "verdict": self.verdict, "status": self.status,
                "stream": self.stream, "elapsed_s": round(self.elapsed, 3)}

    def render(self) -> str:
        kind = "stream" if self.stream else "json"
        return f"{self.request_id}: {self.verdict} ({kind}, status {self.status}, after {self.elapsed:.2f} s)"


@attrs.define
class _Run:
    """Everything one soak run gathers while it runs."""

    options: SoakOptions
    servers: _Servers
    control: httpx.AsyncClient
    say: Callable[[str], None]
    origin: float = 0.0
    tally: _Tally = attrs.field(init=False)
    answers: list[_Answer] = attrs.Factory(list)
    mixes: list[Mix] = attrs.Factory(list)
    health_seconds: list[float] = attrs.Factory(list)
    memory_samples: list[tuple[float, int]] = attrs.Factory(list)
    rss_warm: int | None = None
    warm_sampled: bool = False

    def __attrs_post_init__(self) -> None:
        self.tally = _Tally(self.options.requests)

    def elapsed(self) -> float:
        return trio.current_time() - self.origin

    def note(self, line: str) -> None:
        self.say(f"[{self.elapsed():7.1f}s] {line}")

    def rss(self) -> int | None:
        pid = self.servers.gateway_pid
        return _proc_status(pid).get("VmRSS") if pid is not None else None

    async def drive(self, pools: Sequence[_Pool]) -> None:
        """Send every request, ``concurrency`` at a time (one worker per connection of
        ``pools``); blocks until all are done."""
        options = self.options
        # The planner reads only the model, the stream fraction and the seed.
        planner = Planner(LoadOptions.for_bursts(bursts=1, concurrency=options.concurrency, model=options.model,
                                                 stream=options.stream, seed=options.seed))
        async with trio.open_nursery() as nursery:
            for pool in pools:
                for _ in range(pool.size):
                    nursery.start_soon(self._worker, pool, planner)

    async def _worker(self, pool: _Pool, planner: Planner) -> None:
        tally = self.tally
        while tally.sent < tally.planned:
            plan = planner.next(None)
            tally.sent += 1
            result = await exchange(pool.client, plan, timeout=self.options.client_timeout, origin=self.origin)
            verdict = pool.transport.verdict(plan.request_id, result, expected=_expected_reply(plan))
            self.answers.append(_Answer(plan.request_id, result, verdict))
            if verdict is None:
                tally.no_response += 1
            else:
                tally.answered += 1
                tally.malformed += verdict.kind == "malformed"
            if not self.warm_sampled and tally.answered + tally.no_response >= tally.planned / 10:
                self.warm_sampled = True
                self.rss_warm = self.rss()

    async def chaos(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replace both personalities' fault profiles every ``mix_interval`` seconds,
        until cancelled; reports started once the first mix is in place. Raises
        :class:`SoakError` if the mock refuses a profile or does not answer."""
        options = self.options
        rng = random.Random(f"soak-mixes-{options.seed}")
        for number in itertools.count(1):
            profiles = {
                name: draw_profile(rng, rate=options.fault_rate, stream_fraction=options.stream, kinds=options.faults)
                for name in PROVIDERS
            }
            for name, profile in profiles.items():
                await self._configure({**profile, "provider": name})
            mix = Mix(number, self.elapsed(), profiles)
            self.mixes.append(mix)
            self.note(mix.describe())
            if number == 1:
                task_status.started()
            await trio.sleep(options.mix_interval)

    async def _configure(self, body: Mapping[str, Any]) -> None:
        url = f"{self.servers.mock_url}/config/failures"
        with trio.move_on_after(SIDE_REQUEST_TIMEOUT):
            try:
                response = await self.control.post(url, content=orjson.dumps(body))
            except httpx.RequestError as error:
                raise SoakError(f"cannot configure the mock's faults at {url}: {error!r}") from None
            if response.status_code != 200:
                raise SoakError(f"the mock refused a fault profile ({response.status_code}): {response.text}")
            return
        raise SoakError(f"{url} did not answer within {SIDE_REQUEST_TIMEOUT:g} s")

    async def watch(self) -> None:
        """Every :data:`PROGRESS_PERIOD`: poll ``/health``, sample memory, print a
        progress line; until cancelled."""
        while True:
            await trio.sleep(PROGRESS_PERIOD)
            health, seconds = await _read_health(self.control, self.servers.gateway_url)
            self.health_seconds.append(seconds)
            rss = self.rss()
            if rss is not None:
                self.memory_samples.append((self.elapsed(), rss))
            self.note(self._progress(health, seconds, rss))

    def _progress(self, health: Mapping[str, Any] | None, seconds: float, rss: int | None) -> str:
        tally = self.tally
        done = tally.answered + tally.no_response
        rate = done / self.elapsed() if self.elapsed() > 0 else 0.0
        if health is None:
            gateway = f"/health did not answer ({seconds * 1000:.0f} ms)"
        else:
            circuits = ", ".join(
                f"{name} {_provider_health(health, name).get('circuit', '?')}" for name in PROVIDERS
            )
            gateway = f"circuits {circuits}; /health {seconds * 1000:.0f} ms"
        memory = f"; RSS {rss / MIB:.1f} MiB" if rss is not None else ""
        return (
            f"{done}/{tally.planned} done ({tally.no_response} no response, {tally.malformed} malformed), "
            f"{tally.sent - done} in flight, {rate:.1f}/s; {gateway}{memory}"
        )

    async def restore_mock(self) -> None:
        """Give both personalities healthy profiles again, so that a mock the soak did
        not start is not left misbehaving. Shielded: runs even while the soak is
        cancelled; a mock that does not answer is left as it is."""
        with trio.CancelScope(shield=True):
            with contextlib.suppress(SoakError):  # the mock is gone: nothing to restore
                await self._configure({"provider": "all"})

    async def settle(self) -> tuple[dict[str, Any] | None, float | None]:
        """Wait (up to the deadline, polling ``/health``) for in-flight counts to return
        to 0. Returns the last ``/health`` body (None: it never answered) and how long
        settling took (None: it did not settle, or ``/health`` shows no count to wait for)."""
        started = trio.current_time()
        health: dict[str, Any] | None = None
        with trio.move_on_after(self.options.deadline + 1):
            while True:
                health, _ = await _read_health(self.control, self.servers.gateway_url)
                in_flight = _in_flight(health)
                if in_flight == 0:
                    return health, trio.current_time() - started
                if health is not None and in_flight is None:
                    return health, None
                await trio.sleep(0.1)
        return health, None


def _expected_reply(plan: RequestPlan) -> str:
    """The mock's reply to ``plan``'s prompt: a function of the last user message alone,
    whichever personality answers and however many times the answer was continued."""
    return reply_for(orjson.loads(plan.body)["messages"][-1]["content"])


@attrs.frozen
class _Pool:
    """A client for ``size`` workers, and the watching transport under it."""

    client: httpx.AsyncClient
    transport: _WatchingTransport
    size: int


def _open_pool(options: SoakOptions, gateway_url: str, size: int) -> _Pool:
    """A client as the load script's: keep-alive connections, one per worker, no
    retries, no proxies, no httpx timeouts (``exchange`` bounds each request); under
    it, the watching transport. Identity encoding, so the watched bytes are the body."""
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=KEEPALIVE_EXPIRY)
    transport = _WatchingTransport(httpx.AsyncHTTPTransport(retries=0, limits=limits, trust_env=False))
    headers = {"accept-encoding": "identity"}
    if options.api_key:
        headers["authorization"] = f"Bearer {options.api_key}"
    client = httpx.AsyncClient(base_url=gateway_url, transport=transport, timeout=None, trust_env=False,
                               headers=headers)
    return _Pool(client, transport, size)


@contextlib.asynccontextmanager
async def _open_pools(options: SoakOptions, gateway_url: str) -> AsyncIterator[list[_Pool]]:
    """Pools of :data:`WORKERS_PER_POOL` workers (the last one smaller), as many as the
    concurrency needs; closed on exit."""
    workers = min(options.concurrency, options.requests)
    sizes = [min(WORKERS_PER_POOL, workers - start) for start in range(0, workers, WORKERS_PER_POOL)]
    async with contextlib.AsyncExitStack() as stack:
        pools = [_open_pool(options, gateway_url, size) for size in sizes]
        for pool in pools:
            await stack.enter_async_context(pool.client)
        yield pools


async def run_soak(options: SoakOptions, *, say: Callable[[str], None] | None = None) -> SoakReport:
    """Run the soak described by ``options`` and return its report.

    Blocks for the whole run: starting the servers it must start, every request, the
    settling, stopping what it started. ``say`` receives progress lines (default: none).
    Raises :class:`SoakError` (inside an ``ExceptionGroup`` when it arose in one of the
    run's tasks) when a server does not start or the mock's API fails. Cancelling it
    cancels the requests and still stops the servers it started.
    """
    say = say or (lambda line: None)
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    workdir = options.workdir
    if workdir is None and options.gateway_url is None:  # something to start, and to log
        workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    async with httpx.AsyncClient(timeout=None, trust_env=False) as control:
        async with _open_servers(options, workdir, control) as servers:
            logs = f", logs in {workdir}" if workdir is not None else ""
            say(f"soak: gateway {servers.gateway_url} (pid {servers.gateway_pid or 'unknown'}), "
                f"mock {servers.mock_url}{logs}")
            run = _Run(options, servers, control, say)
            try:
                gathered = await _gather(run)
            finally:
                await run.restore_mock()
        return _report(run, gathered, started_at=started_at, workdir=workdir)


@attrs.frozen
class _Gathered:
    """What the run measured around the requests."""

    primary: str | None
    health_before: dict[str, Any] | None
    health_after: dict[str, Any] | None
    settle: float | None
    stats_before: Mapping[str, Any]
    stats_after: Mapping[str, Any]
    rss_start: int | None
    rss_end: int | None
    peak: int | None
    cpu: float | None
    own_cpu: float
    gateway_alive: bool
    duration: float


async def _gather(run: _Run) -> _Gathered:
    servers, control = run.servers, run.control
    try:
        stats_before = await read_mock_stats(control, servers.mock_url)
    except LoadError as error:
        raise SoakError(str(error)) from None
    health_before, _ = await _read_health(control, servers.gateway_url)
    rss_start = run.rss()
    pid = servers.gateway_pid
    cpu_start = _cpu_seconds(pid) if pid is not None else None
    own_cpu_start = _own_cpu_seconds()
    async with _open_pools(run.options, servers.gateway_url) as pools:
        primary = await discover_primary(pools[0].client, run.options.model)
        run.origin = trio.current_time()
        async with trio.open_nursery() as nursery:
            # The first mix is in place before the first request is sent.
            await nursery.start(run.chaos)
            nursery.start_soon(run.watch)
            await run.drive(pools)
            nursery.cancel_scope.cancel()
    duration = run.elapsed()
    own_cpu = _own_cpu_seconds() - own_cpu_start
    run.note(f"all {run.tally.planned} requests done; waiting for the gateway's in-flight count to reach 0")
    health_after, settle = await run.settle()
    try:
        stats_after = await read_mock_stats(control, servers.mock_url)
    except LoadError as error:
        raise SoakError(str(error)) from None
    status = _proc_status(pid) if pid is not None else {}
    cpu_end = _cpu_seconds(pid) if pid is not None else None
    return _Gathered(
        primary=primary,
        health_before=health_before,
        health_after=health_after,
        settle=settle,
        stats_before=stats_before,
        stats_after=stats_after,
        rss_start=rss_start,
        rss_end=status.get("VmRSS"),
        peak=status.get("VmHWM"),
        cpu=None if cpu_start is None or cpu_end is None else cpu_end - cpu_start,
        own_cpu=own_cpu,
        gateway_alive=servers.gateway_alive(),
        duration=duration,
    )


# -- the report ------------------------------------------------------------------------


@attrs.frozen
class Check:
    """One pass/fail condition of the run."""

    name: str
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


def judge_run(
    *,
    no_response: int,
    malformed: int,
    p99_ms: float | None,
    deadline_s: float,
    gateway_alive: bool,
    health_answered: bool,
    in_flight: int | None,
    stop_status: int | None = None,
) -> tuple[Check, ...]:
    """The soak's checks from its figures (see the module docstring). ``stop_status`` is
    the exit status of a gateway the soak started and stopped (None: not started)."""
    deadline_ms = deadline_s * 1000
    p99_text = "no answers" if p99_ms is None else f"p99 {p99_ms:.1f} ms"
    stopped = () if stop_status is None else (
        Check("gateway stops cleanly", stop_status == 0, f"exit status {stop_status} after SIGTERM"),
    )
    return (
        Check("no response is 0", no_response == 0, f"{no_response} requests got no response"),
        Check("malformed is 0", malformed == 0,
              f"{malformed} answers were neither a complete 200 nor a well-formed error"),
        Check("p99 below the deadline", p99_ms is not None and p99_ms < deadline_ms,
              f"{p99_text} against a deadline of {deadline_ms:.0f} ms"),
        Check("gateway alive", gateway_alive, "alive at the end" if gateway_alive else "the gateway died"),
        Check("/health answers at the end", health_answered,
              "answered" if health_answered else "/health did not answer"),
        Check("in flight returns to 0", in_flight == 0,
              "unknown: /health shows no in-flight count" if in_flight is None else f"{in_flight} left in flight"),
        *stopped,
    )


def exit_status_of(checks: Sequence[Check]) -> int:
    """0 when every check passed, else 1."""
    return 0 if all(check.passed for check in checks) else 1


@attrs.frozen
class SoakReport:
    """The whole report of one soak run."""

    started_at: str
    parameters: Mapping[str, Any]
    gateway_url: str
    gateway_pid: int | None
    gateway_started: bool
    gateway_config: str | None
    gateway_exit_status: int | None
    mock_url: str
    mock_started: bool
    workdir: str | None
    total: Summary
    verdicts: Mapping[str, int]
    malformed: Mapping[str, int]
    #: At most :data:`EXAMPLES` requests per failing reason, to look up in the logs.
    examples: tuple[Example, ...]
    latency_by_status: Mapping[int, Percentiles]
    upstream: Upstream
    breakers: Mapping[str, Breaker]
    memory: Memory | None
    #: CPU seconds the gateway process used from the first request to the end.
    cpu: float | None
    #: CPU seconds the soak's own process used while it sent the requests.
    own_cpu: float
    mixes: tuple[Mix, ...]
    health: Percentiles
    duration: float
    deadline: float
    gateway_alive: bool
    health_answered: bool
    in_flight: int | None
    settle: float | None

    @property
    def checks(self) -> tuple[Check, ...]:
        return judge_run(
            no_response=self.total.lost,
            malformed=self.verdicts["malformed"],
            p99_ms=self.total.latency.p99,
            deadline_s=self.deadline,
            gateway_alive=self.gateway_alive,
            health_answered=self.health_answered,
            in_flight=self.in_flight,
            stop_status=self.gateway_exit_status,
        )

    @property
    def passed(self) -> bool:
        return exit_status_of(self.checks) == 0

    @property
    def exit_status(self) -> int:
        return exit_status_of(self.checks)

    @property
    def throughput(self) -> float | None:
        return self.total.sent / self.duration if self.duration > 0 else None

    def fault_fraction(self) -> dict[str, float | None]:
        """Per personality: the fraction of the mock's answers that were faults."""
        fractions: dict[str, float | None] = {}
        for name, requests in self.upstream.requests.items():
            outcomes = self.upstream.outcomes.get(name, {})
            faults = sum(count for kind, count in outcomes.items() if kind not in ("ok", "invalid_request"))
            fractions[name] = round(faults / requests, 4) if requests else None
        return fractions

    def to_json(self) -> dict[str, Any]:
        total = self.total
        return {
            "version": JSON_VERSION,
            "started_at": self.started_at,
            "parameters": dict(self.parameters),
            "gateway": {"url": self.gateway_url, "pid": self.gateway_pid, "started": self.gateway_started,
                        "config": self.gateway_config},
            "mock": {"url": self.mock_url, "started": self.mock_started},
            "workdir": self.workdir,
            "requests": {
                "sent": total.sent,
                "answered": total.answered,
                "no_response": total.lost,
                "complete": self.verdicts["complete"],
                "well_formed_error": self.verdicts["error"],
                "malformed": self.verdicts["malformed"],
            },
            "malformed": dict(sorted(self.malformed.items())),
            "examples": [example.to_json() for example in self.examples],
            "no_response": dict(sorted(total.lost_by_reason.items())),
            "total": total.to_json(),
            "upstream": self.upstream.to_json(),
            "fault_fraction": self.fault_fraction(),
            "latency_ms": total.latency.to_json(),
            "latency_ms_by_status": {str(status): p.to_json() for status, p in self.latency_by_status.items()},
            "deadline_ms": self.deadline * 1000,
            "health_ms": self.health.to_json(),
            "breakers": {name: attrs.asdict(breaker) for name, breaker in self.breakers.items()},
            "memory": None if self.memory is None else self.memory.to_json(),
            "gateway_cpu_s": None if self.cpu is None else round(self.cpu, 3),
            "soak_cpu_s": round(self.own_cpu, 3),
            "mixes": [mix.to_json() for mix in self.mixes],
            "duration_s": round(self.duration, 3),
            "throughput_per_s": None if self.throughput is None else round(self.throughput, 3),
            "end": {
                "gateway_alive": self.gateway_alive,
                "health_answered": self.health_answered,
                "in_flight": self.in_flight,
                "settle_s": None if self.settle is None else round(self.settle, 3),
                "gateway_exit_status": self.gateway_exit_status,
            },
            "checks": [check.to_json() for check in self.checks],
            "passed": self.passed,
        }

    def render(self) -> str:
        """The report as text lines (the README's Chaos soak section explains them)."""
        p = self.parameters
        headline = (
            f"orchestrator soak: {p['requests']} requests, {p['concurrency']} at a time, "
            f"{p['stream']:.0%} streamed, model {p['model']}; faults {p['fault_rate']:.0%} of upstream requests, "
            f"a new mix every {p['mix_interval_s']:g} s ({len(self.mixes)} in all); seed {p['seed']}"
        )
        lines = [headline]
        lines += [f"  {label:<16}{text}" for label, text in self._lines()]
        if self.examples:
            lines.append("failing requests (grep the gateway's log for their ids)")
            lines += [f"  {example.render()}" for example in self.examples]
        lines.append("checks")
        lines += [f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}" for check in self.checks]
        lines.append(f"verdict: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)

    def _lines(self) -> list[tuple[str, str]]:
        total, upstream = self.total, self.upstream
        started = " (started by the soak)" if self.gateway_started else ""
        pid = f", pid {self.gateway_pid}" if self.gateway_pid is not None else ""
        mock = " (started by the soak)" if self.mock_started else ""
        verdicts = self.verdicts
        header_mean = "-" if total.attempts.mean is None else f"{total.attempts.mean:.2f}"
        per_request = "-" if upstream.per_request is None else f"{upstream.per_request:.2f}"
        fractions = ", ".join(
            f"{name} {'-' if fraction is None else f'{fraction:.1%}'} of {upstream.requests[name]}"
            for name, fraction in self.fault_fraction().items()
        )
        latency = total.latency.render() if total.latency.max is not None else "none"
        return [
            ("gateway", f"{self.gateway_url}{pid}{started}"),
            ("mock", f"{self.mock_url}{mock}"),
            ("requests", f"{total.sent} sent = {total.answered} answered + {total.lost} no response"),
            ("answers", f"{verdicts['complete']} complete, {verdicts['error']} well-formed errors, "
                        f"{verdicts['malformed']} malformed"),
            ("malformed", _counts(self.malformed)),
            ("no response", _counts(total.lost_by_reason)),
            ("status", _counts(total.status)),
            ("provider", _counts(total.provider)),
            ("errors", _counts(total.errors)),
            ("stream errors", _counts(total.stream_errors)),
            ("attempts", f"gateway headers: {_counts(total.attempts.distribution)} (mean {header_mean}); "
                         f"the mock saw {upstream.total} = {per_request} per request "
                         f"({_counts(upstream.requests)})"),
            ("mock faults", fractions),
            ("mock outcomes", "; ".join(f"{name}: {_counts(kinds)}" for name, kinds in upstream.outcomes.items())),
            ("latency", f"{latency}; deadline {self.deadline * 1000:.0f} ms"),
            *((f"  status {status}", p.render()) for status, p in self.latency_by_status.items()),
            ("/health", f"{self.health.render()} (polled every {PROGRESS_PERIOD:g} s under load)"),
            ("breakers", "transitions " + ", ".join(
                f"{name} {'?' if breaker.transitions is None else breaker.transitions}"
                for name, breaker in self.breakers.items()
            ) + "; at the end " + ", ".join(
                f"{name} {breaker.circuit_at_end or '?'}" for name, breaker in self.breakers.items()
            )),
            ("memory", self._memory_line()),
            ("cpu", self._cpu_line()),
            ("duration", f"{self.duration:.1f} s, "
                         f"{'-' if self.throughput is None else f'{self.throughput:.1f}'} requests/s"),
            ("end", self._end_line()),
        ]

    def _memory_line(self) -> str:
        memory = self.memory
        if memory is None:
            return "not measured (a gateway the soak did not start, without --gateway-pid)"
        parts = [f"gateway RSS {memory.rss_start / MIB:.1f} MiB at start"]
        if memory.rss_warm is not None:
            parts.append(f"{memory.rss_warm / MIB:.1f} MiB after a tenth of the requests")
        if memory.rss_end is not None:
            parts.append(f"{memory.rss_end / MIB:.1f} MiB at the end")
        if memory.peak is not None:
            parts.append(f"peak {memory.peak / MIB:.1f} MiB")
        return ", ".join(parts)

    def _cpu_line(self) -> str:
        own = f"the soak itself {self.own_cpu:.1f} s"
        if self.cpu is None:
            return f"gateway not measured; {own}"
        per_request = self.cpu / self.total.sent * 1000 if self.total.sent else 0.0
        busy = self.cpu / self.duration if self.duration > 0 else 0.0
        return (f"gateway {self.cpu:.1f} s ({per_request:.2f} ms per request, {busy:.0%} of one core on average); "
                f"{own}")

    def _end_line(self) -> str:
        if self.in_flight is None:
            settle = "unknown (/health shows no in-flight count)"
        elif self.settle is None:
            settle = f"still {self.in_flight} after the deadline"
        else:
            settle = f"0 after {self.settle:.2f} s"
        exit_text = ""
        if self.gateway_started:
            exit_text = f"; exit status after SIGTERM {self.gateway_exit_status}"
        return (
            f"gateway {'alive' if self.gateway_alive else 'DEAD'}, "
            f"/health {'answered' if self.health_answered else 'did NOT answer'}, in flight {settle}{exit_text}"
        )


def _counts(counts: Mapping[Any, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{key}: {count}" for key, count in sorted(counts.items(), key=lambda item: str(item[0])))


def _examples(answers: Sequence[_Answer]) -> tuple[Example, ...]:
    """The first :data:`EXAMPLES` failing requests of each reason, in the order sent."""
    failing = sorted(
        (Example.of(answer) for answer in answers if answer.verdict is None or answer.verdict.kind == "malformed"),
        key=lambda example: int(example.request_id.rpartition("-")[2]),
    )
    seen: Counter[str] = Counter()
    kept = []
    for example in failing:
        seen[example.verdict] += 1
        if seen[example.verdict] <= EXAMPLES:
            kept.append(example)
    return tuple(kept)


def _report(run: _Run, gathered: _Gathered, *, started_at: str, workdir: Path | None) -> SoakReport:
    options, servers = run.options, run.servers
    results = sorted((answer.result for answer in run.answers), key=lambda result: result.index)
    total = Summary.of(results, primary=gathered.primary)
    verdicts = [answer.verdict for answer in run.answers if answer.verdict is not None]
    kinds = Counter(verdict.kind for verdict in verdicts)
    try:
        upstream = Upstream.between(gathered.stats_before, gathered.stats_after, mock_url=servers.mock_url,
                                    sent=total.sent, header_attempts=total.attempts.total)
    except ValueError as error:
        raise SoakError(str(error)) from None
    memory = None
    if gathered.rss_start is not None and servers.gateway_pid is not None:
        memory = Memory(servers.gateway_pid, gathered.rss_start, run.rss_warm, gathered.rss_end, gathered.peak,
                        tuple(run.memory_samples))
    return SoakReport(
        started_at=started_at,
        parameters=options.parameters(),
        gateway_url=servers.gateway_url,
        gateway_pid=servers.gateway_pid,
        gateway_started=servers.gateway is not None,
        gateway_config=servers.config,
        gateway_exit_status=servers.gateway.exit_status if servers.gateway is not None else None,
        mock_url=servers.mock_url,
        mock_started=servers.mock is not None,
        workdir=None if workdir is None else str(workdir),
        total=total,
        verdicts={kind: kinds.get(kind, 0) for kind in ("complete", "error", "malformed")},
        malformed=dict(Counter(v.reason or "unknown" for v in verdicts if v.kind == "malformed")),
        examples=_examples(run.answers),
        latency_by_status={
            status: Percentiles.of_seconds(result.elapsed for result in results if result.status == status)
            for status in sorted(total.status)
        },
        upstream=upstream,
        breakers={name: Breaker.between(gathered.health_before, gathered.health_after, name) for name in PROVIDERS},
        memory=memory,
        cpu=gathered.cpu,
        own_cpu=gathered.own_cpu,
        mixes=tuple(run.mixes),
        health=Percentiles.of_seconds(run.health_seconds),
        duration=gathered.duration,
        deadline=options.deadline,
        gateway_alive=gathered.gateway_alive,
        health_answered=gathered.health_after is not None,
        in_flight=_in_flight(gathered.health_after),
        settle=gathered.settle,
    )


# -- command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.soak``: run, print the report, write the JSON; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.soak",
                                     description="A chaos soak of the gateway: load while the mock misbehaves.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        options = SoakOptions.from_args(args)
    except UsageError as error:
        print(f"soak: {error}", file=sys.stderr)
        return 2
    json_to_stdout = options.json_path == "-"
    report: SoakReport | None = None
    failure: str | None = None
    try:
        report = trio.run(partial(run_soak, options, say=partial(_say, sys.stderr)))
    except* KeyboardInterrupt:
        failure = "interrupted"
    except* SoakError as group:
        failure = "; ".join(str(error) for error in group.exceptions)
    if report is None:
        print(f"soak: no report: {failure}", file=sys.stderr)
        return 130 if failure == "interrupted" else 3
    print(report.render(), file=sys.stderr if json_to_stdout else sys.stdout, flush=True)
    if options.json_path:
        data = orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n"
        if json_to_stdout:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            try:
                Path(options.json_path).write_bytes(data)
            except OSError as error:
                print(f"soak: cannot write {options.json_path}: {error.strerror}", file=sys.stderr)
                return 3
    return report.exit_status


def _say(stream: TextIO, line: str) -> None:
    print(line, file=stream, flush=True)


if __name__ == "__main__":
    sys.exit(main())
