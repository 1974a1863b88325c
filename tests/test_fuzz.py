"""Schemathesis against a live gateway: whatever a client sends, no 5xx and no crash.

The gateway and a healthy mock provider serve on loopback in a background thread with
their own ``trio.run`` (schemathesis drives ``requests`` synchronously from the test's
thread). Client and admin keys are configured, so the document lists every operation
and the bearer schemes, and schemathesis checks that requests without a key are refused.

Every operation gets positive cases (which must be answered 2xx) and negative ones
(which must get a 4xx), from the explicit examples, the coverage phase and
``MAX_EXAMPLES`` fuzzed ones, and each response must match the documented status codes,
content types, headers and bodies. The mock never fails, so any 5xx is the gateway's
own, with one exception: a client that asks for a deadline too short to reach the
provider gets its honest 504.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import attrs
import httpx
import pytest
import schemathesis
import trio
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from mock_server import MockState
from mock_server import create_app as create_mock_app
from orchestrator import openapi
from orchestrator.config import Config
from orchestrator.hosting import serve
from gateway_fixtures import demo_config, start_gateway

CLIENT_KEY = "sk-fuzz-client-0123456789"
ADMIN_KEY = "sk-fuzz-admin-0123456789"
CLIENT_AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
#: Fuzzed cases per operation, on top of the explicit examples and the coverage phase, and
#: the seed; a longer campaign by hand: FUZZ_EXAMPLES=2000 FUZZ_SEED=$RANDOM pytest tests/test_fuzz.py
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
#: A deadline (X-Request-Timeout, seconds) this short may expire before the mock answers.
SHORT_DEADLINE = 1.0


def fuzz_config(mock_url: str) -> Config:
    return attrs.evolve(demo_config(mock_url), client_keys=(CLIENT_KEY,), admin_keys=(ADMIN_KEY,))


@contextmanager
def gateway_in_thread(make_config: Callable[[str], Config]) -> Iterator[str]:
    """Serve the mock and the gateway in a thread of their own; yield the gateway's URL.

    Leaving cancels their nursery from this thread and waits for the thread to end.
    """
    started: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.CancelScope] | BaseException] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            [mock_url] = await nursery.start(partial(serve, create_mock_app(MockState.create(seed=7))))
            url = await start_gateway(nursery, make_config(mock_url))
            started.put((url, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as error:  # reported to the test thread, which re-raises it
            started.put(error)

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    outcome = started.get(timeout=30)
    if isinstance(outcome, BaseException):
        raise outcome
    url, token, everything = outcome
    try:
        yield url
    finally:
        try:
            trio.from_thread.run_sync(everything.cancel, trio_token=token)
        except trio.RunFinishedError:
            pass  # it crashed on its own: the error is waiting in the queue
        thread.join(timeout=30)
        assert not thread.is_alive(), "the gateway thread did not stop"
    if not started.empty():
        raise started.get()  # the gateway crashed while it was being fuzzed


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    with gateway_in_thread(fuzz_config) as url:
        yield url
    # Still answering after the whole run: checked by the last test of the module.


#: The document depends on the configuration, not on where the mock listens, so the
#: schema can be built at import time (schemathesis' lazy fixture loader does not run
#: on pytest 9); a test below checks that the live gateway serves this very document.
DOCUMENT = openapi.document(fuzz_config("http://127.0.0.1:1"))
SETTINGS = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        # No example database: the same seed sends the same cases on every machine.
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "auth": {"openapi": {"clientKey": {"bearer": CLIENT_KEY}, "adminKey": {"bearer": ADMIN_KEY}}},
        "request-timeout": 30,
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=SETTINGS)


def test_the_live_gateway_serves_the_fuzzed_document(gateway_url: str) -> None:
    assert httpx.get(f"{gateway_url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
def test_gateway_survives_schemathesis(case: schemathesis.Case, gateway_url: str) -> None:
    _give_time_to_answer(case)
    response = case.call(base_url=gateway_url)
    excluded = []
    if _client_deadline_expired(case, response):
        excluded += [not_a_server_error, positive_data_acceptance, negative_data_rejection]
    case.validate_response(response, excluded_checks=excluded, transport_kwargs={"base_url": gateway_url})


def test_a_405_says_which_methods_are_allowed(gateway_url: str) -> None:
    response = httpx.delete(f"{gateway_url}/health")
    assert response.status_code == 405
    assert response.headers.get("allow") in ("GET, HEAD", "HEAD, GET")
    # The chat-completions handler sits in front of quart: the same answer, from it.
    response = httpx.get(f"{gateway_url}/v1/chat/completions")
    assert response.status_code == 405
    assert response.headers.get("allow") == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_number_for_modalities_does_not_stop_the_gateway() -> None:
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}], "modalities": 1}
    with gateway_in_thread(fuzz_config) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=CLIENT_AUTH)
        assert response.status_code in (200, 400)
        assert httpx.get(f"{url}/health").status_code == 200


def _give_time_to_answer(case: schemathesis.Case) -> None:
    """Lengthen a positive case's tiny ``X-Request-Timeout`` (the coverage phase sends
    5e-324 with most bodies), which would get an honest 504 before its body is ever
    routed; the header's parsing is still fuzzed by every other value."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    seconds = _request_timeout(case)
    if seconds is not None and 0 < seconds < SHORT_DEADLINE:
        case.headers["X-Request-Timeout"] = str(SHORT_DEADLINE * 10)


def _client_deadline_expired(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """A 504 ``deadline_exceeded`` for a deadline the client itself made too short (a
    negative case whose flaw the gateway ignores, say an unknown header)."""
    seconds = _request_timeout(case)
    return (
        response.status_code == 504
        and seconds is not None
        and seconds < SHORT_DEADLINE
        and response.json()["error"]["code"] == "deadline_exceeded"
    )


def _request_timeout(case: schemathesis.Case) -> float | None:
    try:
        return float((case.headers or {})["X-Request-Timeout"])
    except (KeyError, TypeError, ValueError):
        return None


def test_gateway_still_answers_after_the_run(gateway_url: str) -> None:
    response = httpx.get(f"{gateway_url}/health", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "healthy"
