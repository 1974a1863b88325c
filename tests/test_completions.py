"""The chat-completions ASGI handler on its own: ASGI messages in and out, mock clock.

The HTTP tests (test_gateway_e2e, test_hardening, test_streaming) drive it through
hypercorn; these pin what only shows at the ASGI level: the disconnect paths with and
without the hosting extension, and exactly which messages go out.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import trio

from mock_server import open_mock_transport
from mock_server.faults import FaultProfile
from orchestrator.completions import ChatCompletions
from orchestrator.config import Config
from orchestrator.hosting import DISCONNECT_EXTENSION
from orchestrator.service import open_orchestrator

BODY = orjson.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
STREAM_BODY = orjson.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "stream": True})


def config() -> Config:
    return Config.from_mapping({
        "seed": 3,
        "providers": {"openai": {"kind": "openai", "base_url": "http://mock/v1"}},
        "routes": [{"match": "gpt-*", "deployments": [{"provider": "openai"}]}],
    })


@pytest.fixture
async def gw(mock_state):
    async with open_mock_transport(mock_state) as transport, open_orchestrator(config(), transport=transport) as gw:
        yield gw


class Exchange:
    """One request's ASGI conversation: what the handler received and sent."""

    def __init__(self, body: bytes, *, method: str = "POST", headers: dict[str, str] | None = None) -> None:
        self.inbox: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]
        self.sent: list[dict[str, Any]] = []
        self.gone = trio.Event()
        self.scope: dict[str, Any] = {
            "type": "http", "method": method, "path": "/v1/chat/completions", "extensions": {},
            "headers": [(name.encode(), value.encode()) for name, value in (headers or {}).items()],
        }

    async def receive(self) -> dict[str, Any]:
        if self.inbox:
            return self.inbox.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> dict[str, str]:
        return {name.decode(): value.decode() for name, value in self.sent[0]["headers"]}

    @property
    def content(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent[1:])


async def test_an_answer_is_one_start_and_one_body_with_the_journey_headers(autojump_clock, gw):
    exchange = Exchange(BODY, headers={"x-request-id": "trace-1"})
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    assert [message["type"] for message in exchange.sent] == ["http.response.start", "http.response.body"]
    assert exchange.status == 200
    assert exchange.headers["x-request-id"] == "trace-1"
    assert exchange.headers["x-orchestrator-provider"] == "openai"
    assert exchange.headers["x-orchestrator-attempts"] == "1"
    assert int(exchange.headers["content-length"]) == len(exchange.content)
    assert orjson.loads(exchange.content)["object"] == "chat.completion"


def events(body: bytes) -> list[bytes]:
    return [event.removeprefix(b"data: ") for event in body.split(b"\n\n") if event]


async def test_a_stream_that_arrives_at_once_is_one_body_message_ending_with_done(autojump_clock, gw):
    exchange = Exchange(STREAM_BODY)
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 200
    assert exchange.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in exchange.headers
    # The mock writes an unpaced stream at once: the gateway passes it on as the
    # response's one body message, so the server writes it with the body's end.
    [start, body] = exchange.sent
    assert body["more_body"] is False
    *chunks, done = events(body["body"])
    assert done == b"[DONE]"
    assert orjson.loads(chunks[0])["choices"][0]["delta"]["role"] == "assistant"
    assert orjson.loads(chunks[-1])["choices"][0]["finish_reason"] == "stop"


async def test_a_paced_stream_ends_with_done_in_the_message_of_its_last_chunks(autojump_clock, gw, mock_state):
    mock_state.configure(FaultProfile(chunk_delay_ms=20))
    exchange = Exchange(STREAM_BODY)
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    bodies = exchange.sent[1:]
    assert len(bodies) > 2
    assert all(message["more_body"] for message in bodies[:-1])
    assert bodies[-1]["more_body"] is False
    # The mock's last write holds the last token, the finish chunk and its [DONE].
    *last_chunks, done = events(bodies[-1]["body"])
    assert done == b"[DONE]"
    assert [orjson.loads(chunk)["choices"][0]["finish_reason"] for chunk in last_chunks] == [None, "stop"]


async def test_a_stream_with_usage_ends_with_the_usage_chunk_before_done(autojump_clock, gw):
    body = orjson.dumps({**orjson.loads(STREAM_BODY), "stream_options": {"include_usage": True}})
    exchange = Exchange(body)
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    [start, body] = exchange.sent
    *chunks, usage, done = events(body["body"])
    assert done == b"[DONE]"
    usage = orjson.loads(usage)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(chunks) - 2


@pytest.mark.parametrize("served_by_hosting", [True, False], ids=["extension", "watcher task"])
@pytest.mark.parametrize(("body", "leave_at"), [(BODY, 2), (STREAM_BODY, 7)], ids=["json", "stream"])
async def test_a_client_leaving_cancels_the_upstream_call_at_once(
    autojump_clock, gw, mock_state, served_by_hosting, body, leave_at, caplog
):
    caplog.set_level(logging.INFO, "orchestrator")
    mock_state.configure(FaultProfile(latency_ms=5000, chunk_delay_ms=1000))
    exchange = Exchange(body, headers={"x-request-id": "leaver-1"})
    if served_by_hosting:
        on_disconnect: list[trio.CancelScope] = []
        exchange.scope["extensions"][DISCONNECT_EXTENSION] = on_disconnect.append

        async def leave() -> None:
            exchange.gone.set()
            on_disconnect[0].cancel()  # what hosting's connection does when the client goes
    else:
        async def leave() -> None:
            exchange.gone.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ChatCompletions(gw, []), exchange.scope, exchange.receive, exchange.send)
        await trio.sleep(leave_at)  # during the latency, or mid-way through the chunks
        await leave()
        left = trio.current_time()
    assert trio.current_time() == left  # the handler returned without waiting for anything
    await trio.testing.wait_all_tasks_blocked()
    assert mock_state["openai"].stats.disconnects == 1
    assert (await gw.health())["in_flight"] == 0
    assert not exchange.sent or exchange.sent[-1].get("more_body")  # no ending was sent
    # The journey's log still ends with a line saying how: upstream, or mid-stream.
    journey = [record for record in caplog.records if getattr(record, "request_id", None) == "leaver-1"]
    assert journey[-1].event == "cancelled"
    assert journey[-1].fields["elapsed_ms"] == leave_at * 1000
    assert ("chunks" in journey[-1].getMessage()) == (body is STREAM_BODY)


async def test_a_body_nested_deeper_than_the_adapters_can_write_is_400_before_any_call(autojump_clock, gw, mock_state):
    # 400 levels of schema: orjson reads up to 1024 but writes only 254 (so this is built as text).
    parameters = b'{"type":"object","properties":{"x":' * 200 + b"{}" + b"}}" * 200
    body = (b'{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],'
            b'"tools":[{"type":"function","function":{"name":"f","parameters":' + parameters + b"}}]}")
    exchange = Exchange(body)
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 400
    error = orjson.loads(exchange.content)["error"]
    assert error["param"] == "tools[0].function.parameters"
    assert error["type"] == "invalid_request_error"
    assert mock_state["openai"].stats.requests == 0


async def test_a_model_name_cannot_forge_log_lines(autojump_clock, gw, mock_state, caplog):
    caplog.set_level(logging.INFO, "orchestrator")
    body = orjson.dumps({"model": "gpt-4\n19:00:00.000 INFO  [req_fake] forged", "messages": [{"role": "user", "content": "hi"}]})
    exchange = Exchange(body)
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 400
    assert orjson.loads(exchange.content)["error"]["param"] == "model"
    assert mock_state["openai"].stats.requests == 0
    assert "forged" not in caplog.text


async def test_a_body_that_does_not_arrive_in_time_is_408(autojump_clock, gw):
    exchange = Exchange(b"{")
    exchange.inbox[0]["more_body"] = True  # and nothing more comes
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 408
    assert trio.current_time() == gw.config.body_timeout
    assert orjson.loads(exchange.content)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("method", ["GET", "PUT", "HEAD"])
async def test_other_methods_are_405_with_allow(autojump_clock, gw, method):
    exchange = Exchange(b"", method=method)
    await ChatCompletions(gw, [])(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 405
    assert exchange.headers["allow"] == "POST"
    assert orjson.loads(exchange.content)["error"]["code"] == "method_not_allowed"


async def test_a_wrong_key_is_401_before_the_body_is_read(autojump_clock, gw, mock_state):
    exchange = Exchange(BODY, headers={"authorization": "Bearer nope"})
    await ChatCompletions(gw, [b"sk-right"])(exchange.scope, exchange.receive, exchange.send)
    assert exchange.status == 401
    assert exchange.inbox  # the body was never read
    assert mock_state["openai"].stats.requests == 0


async def test_a_caller_cancelling_during_a_backoff_ends_the_journey_with_a_line(autojump_clock, gw, mock_state, caplog):
    caplog.set_level(logging.INFO, "orchestrator")
    mock_state.configure(FaultProfile(server_error_probability=1.0))
    with trio.move_on_after(1):  # the first attempt fails at once, and the backoff is 2 s
        await gw.chat_completion(orjson.loads(BODY), request_id="waiter-1")
    journey = [record for record in caplog.records if getattr(record, "request_id", None) == "waiter-1"]
    assert [record.event for record in journey[-2:]] == ["backoff", "cancelled"]
    assert journey[-1].fields["attempts"] == 1 and journey[-1].levelno == logging.INFO
    assert "1 attempt: a deadline its caller set passed" in journey[-1].getMessage()
