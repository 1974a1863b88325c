"""The trio embedding API: the same router in-process, against the mock in-process.

No sockets, so trio's autojump clock makes the mock's stalls and the gateway's
waits instant and exact.
"""

from __future__ import annotations

import random

import pytest
import trio

from gateway_fixtures import demo_config
from mock_server import open_mock_transport
from mock_server.faults import FaultProfile
from orchestrator import errors
from orchestrator.backoff import backoff_delay
from orchestrator.config import RetryPolicy
from orchestrator.service import open_orchestrator

REQUEST = {"model": "gpt-4", "messages": [{"role": "user", "content": "hello world"}]}


@pytest.fixture
async def gw(mock_state):
    async with open_mock_transport(mock_state) as transport:
        async with open_orchestrator(demo_config(), transport=transport) as gw:
            yield gw


def fail(mock_state, provider="openai", **profile):
    mock_state.configure(FaultProfile(**profile), provider)


async def test_chat_completion(autojump_clock, gw, mock_state):
    completion = await gw.chat_completion(REQUEST)
    assert completion.provider == "openai"
    assert completion.body["choices"][0]["message"]["content"]
    assert [attempt.outcome for attempt in completion.attempts] == ["ok"]
    assert mock_state["openai"].stats.requests == 1


async def test_streaming(autojump_clock, gw):
    async with gw.stream_chat_completion(REQUEST) as chunks:
        assert chunks.provider == "openai"
        pieces = [chunk async for chunk in chunks]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in pieces if c["choices"])
    assert text == chunks.text and text
    assert chunks.finish_reason == "stop"
    assert chunks.usage["completion_tokens"] == len(text.split())
    assert {c["id"] for c in pieces} == {chunks.id}


async def test_streaming_from_anthropic_is_openai_shaped(autojump_clock, gw, mock_state):
    fail(mock_state, rate_limit_probability=1.0)
    async with gw.stream_chat_completion({**REQUEST, "stream_options": {"include_usage": True}, "stream": True}) as chunks:
        pieces = [chunk async for chunk in chunks]
    assert chunks.provider == "anthropic"
    assert pieces[0]["object"] == "chat.completion.chunk"
    assert pieces[-1]["choices"] == [] and pieces[-1]["usage"]["completion_tokens"] > 0
    assert pieces[-2]["choices"][0]["finish_reason"] == "stop"


async def test_timeouts_everywhere_take_exactly_the_retries_and_waits(autojump_clock, mock_state):
    fail(mock_state, provider="all", timeout_probability=1.0, timeout_duration_seconds=3)
    rng = random.Random(5)
    waits = [backoff_delay(n, RetryPolicy(), rng) for n in (1, 2, 1, 2)]
    async with open_mock_transport(mock_state) as transport:
        async with open_orchestrator(demo_config(seed=5), transport=transport) as gw:
            start = trio.current_time()
            with pytest.raises(errors.AllProvidersFailed) as caught:
                await gw.chat_completion(REQUEST)
            elapsed = trio.current_time() - start
    # openai: 3 s, wait, 3 s, wait, 3 s; then anthropic (the last deployment) the same.
    assert elapsed == pytest.approx(6 * 3 + sum(waits))
    assert [(a.provider, a.outcome) for a in caught.value.attempts] == [("openai", "timeout")] * 3 + [
        ("anthropic", "timeout")] * 3


async def test_typed_errors(autojump_clock, gw):
    with pytest.raises(errors.InvalidRequest) as caught:
        await gw.chat_completion({"model": "gpt-4", "messages": []})
    assert caught.value.param == "messages"
    with pytest.raises(errors.ModelNotFound):
        await gw.chat_completion({"model": "unknown", "messages": REQUEST["messages"]})
    with pytest.raises(errors.InvalidRequest):
        await gw.chat_completion({**REQUEST, "stream": True})


async def test_leaving_a_stream_early_cancels_the_upstream_call(autojump_clock, gw, mock_state):
    fail(mock_state, chunk_delay_ms=100)
    async with gw.stream_chat_completion(REQUEST) as chunks:
        async for _ in chunks:
            break
    await trio.sleep(1)
    assert mock_state["openai"].stats.disconnects == 1
    health = await gw.health()
    assert health["providers"]["openai"]["in_flight"] == 0
    assert health["providers"]["openai"]["totals"] == {"cancelled": 1}
    assert gw.in_flight == 0
