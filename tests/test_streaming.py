"""Streaming that never lies: the commit point, timeouts, honest endings, continuation.

In-process against the mock's stream faults under the autojump clock, so every
timeout is asserted to the exact instant; then over real sockets with the official
``openai`` SDK as the client. The mock's reply to a prompt is deterministic
(``reply_for``), so "one complete answer" is checked against the exact text.
"""

from __future__ import annotations

import gc
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
import trio.testing

from gateway_fixtures import seed_giving, start_gateway
from mock_server import open_mock_transport
from mock_server.conversation import count_tokens, reply_for
from mock_server.faults import FaultProfile
from orchestrator.config import Config
from orchestrator.errors import AllProvidersFailed, StreamInterrupted
from orchestrator.service import open_orchestrator
import providers.actor

PROMPT = "tell me a story"
REPLY = reply_for(PROMPT)
REQUEST = {"model": "gpt-4", "messages": [{"role": "user", "content": PROMPT}],
           "stream": True, "stream_options": {"include_usage": True}}
FIRST_TOKEN = 5.0
IDLE = 4.0


def config(mock_url: str = "http://mock", *, openai_prefill: bool = False, anthropic_prefill: bool = True,
           **top: Any) -> Config:
    timeouts = {"first_token_timeout_seconds": FIRST_TOKEN, "idle_timeout_seconds": IDLE}
    return Config.from_mapping({
        "seed": 3,
        "providers": {
            "openai": {"kind": "openai", "base_url": f"{mock_url}/v1", **timeouts},
            "anthropic": {"kind": "anthropic", "base_url": mock_url, **timeouts},
        },
        "routes": [{"match": "gpt-*", "deployments": [
            {"provider": "openai", "prefill": openai_prefill},
            {"provider": "anthropic", "model": "claude-sonnet-4-5", "prefill": anthropic_prefill},
        ]}],
        **top,
    })


def fault(mock_state, provider: str = "openai", **profile: Any) -> None:
    mock_state.configure(FaultProfile(**profile), provider)


class Run:
    """One streamed request through the embedding API, recorded."""

    def __init__(self) -> None:
        self.chunks: list[dict] = []
        self.error: StreamInterrupted | None = None
        self.stream = None
        self.committed_at: float | None = None
        self.ended_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"])

    @property
    def usage(self) -> dict | None:
        return self.chunks[-1].get("usage") if self.chunks and not self.chunks[-1]["choices"] else None


async def stream_once(gw, request=REQUEST) -> Run:
    run = Run()
    async with gw.stream_chat_completion(request) as chunks:
        run.stream = chunks
        run.committed_at = trio.current_time()
        try:
            async for chunk in chunks:
                run.chunks.append(chunk)
        except StreamInterrupted as error:
            run.error = error
    run.ended_at = trio.current_time()
    return run


@pytest.fixture
async def transport(mock_state):
    async with open_mock_transport(mock_state) as transport:
        yield transport


@pytest.fixture
async def gw(transport):
    async with open_orchestrator(config(), transport=transport) as gw:
        yield gw


async def assert_healthy(gw) -> None:
    await trio.testing.wait_all_tasks_blocked()
    health = await gw.health()
    for provider in health["providers"].values():
        assert provider["in_flight"] == 0
    assert gw.in_flight == 0


# -- a healthy stream -----------------------------------------------------------------

async def test_a_healthy_stream_is_one_complete_answer(autojump_clock, gw, mock_state):
    run = await stream_once(gw)
    assert run.error is None and run.text == REPLY
    assert run.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert run.chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert run.usage == {"prompt_tokens": count_tokens(PROMPT), "completion_tokens": count_tokens(REPLY),
                         "total_tokens": count_tokens(PROMPT) + count_tokens(REPLY)}
    assert {c["id"] for c in run.chunks} == {run.stream.id}
    health = await gw.health()
    assert health["providers"]["openai"]["totals"] == {"ok": 1}


async def test_answers_leave_no_reference_cycles(autojump_clock, gw):
    # The server collects cyclic garbage seldom (hosting.tune_collector_for_serving): a
    # cycle through a request's objects would keep all of them until a collection.
    def ours() -> list[str]:
        gc.collect()
        return [type(thing).__qualname__ for thing in gc.garbage
                if type(thing).__module__.partition(".")[0] in ("orchestrator", "providers")]

    await stream_once(gw)  # warm: first-use caches
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await gw.chat_completion({**REQUEST, "stream": False, "stream_options": None})
        assert ours() == []
        assert (await stream_once(gw)).text == REPLY
        assert ours() == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_a_stream_without_done_is_finalised_promptly_and_counted_a_success(autojump_clock, gw, mock_state):
    fault(mock_state, no_done_probability=1.0, chunk_delay_ms=10)
    start = trio.current_time()
    run = await stream_once(gw)
    assert run.error is None and run.text == REPLY
    assert run.usage["completion_tokens"] == count_tokens(REPLY)
    # No idle wait for a [DONE] that never comes: the finish and the usage end it.
    assert run.ended_at - start == pytest.approx((count_tokens(REPLY) - 1) * 0.010)
    assert (await gw.health())["providers"]["openai"]["totals"] == {"ok": 1}


# -- before the commit point: invisible retries and failovers ------------------------------

async def test_a_cut_before_the_first_token_is_retried_invisibly(autojump_clock, gw, mock_state):
    fault(mock_state, stream_cut_probability=1.0, stream_cut_after_chunks=0)
    run = await stream_once(gw)
    assert run.error is None and run.text == REPLY
    assert run.stream.provider == "anthropic"
    outcomes = [(a.provider, a.outcome) for a in run.stream._journey.attempts]
    assert outcomes == [("openai", "stream_cut")] * 3 + [("anthropic", "ok")]
    assert mock_state["openai"].stats.outcomes["stream_cut"] == 3
    await assert_healthy(gw)


async def test_a_malformed_chunk_before_the_first_token_is_a_failed_attempt(autojump_clock, gw, mock_state):
    fault(mock_state, malformed_chunk_probability=1.0, stream_fault_after_chunks=0)
    run = await stream_once(gw)
    assert run.error is None and run.text == REPLY
    assert [a.outcome for a in run.stream._journey.attempts] == ["malformed_response"] * 3 + ["ok"]


async def test_the_first_token_timeout_fails_over_at_the_exact_instant(autojump_clock, gw, mock_state):
    fault(mock_state, slow_first_token_probability=1.0, first_token_delay_seconds=60)
    start = trio.current_time()
    run = await stream_once(gw)
    assert run.committed_at - start == pytest.approx(FIRST_TOKEN)
    assert run.stream.provider == "anthropic" and run.text == REPLY
    assert [a.outcome for a in run.stream._journey.attempts] == ["timeout", "ok"]
    await trio.testing.wait_all_tasks_blocked()
    assert mock_state["openai"].stats.disconnects == 1  # the slow stream was closed
    health = await gw.health()
    assert health["providers"]["openai"]["consecutive_failures"] == 1


async def test_a_stall_before_the_first_token_is_the_first_token_timeout(autojump_clock, gw, mock_state):
    fault(mock_state, stream_stall_probability=1.0, stream_fault_after_chunks=0, stream_stall_seconds=60)
    start = trio.current_time()
    run = await stream_once(gw)
    assert run.committed_at - start == pytest.approx(FIRST_TOKEN)
    assert run.stream.provider == "anthropic" and run.error is None


async def test_nothing_can_start_is_a_clean_error_before_any_byte(autojump_clock, gw, mock_state):
    fault(mock_state, "all", stream_cut_probability=1.0, stream_cut_after_chunks=0)
    with pytest.raises(AllProvidersFailed) as caught:
        await stream_once(gw)
    assert len(caught.value.attempts) == 6
    await assert_healthy(gw)


# -- after the commit point: continuation, or an honest error ------------------------------

async def test_a_cut_after_commit_is_continued_on_a_prefill_deployment(autojump_clock, gw, mock_state):
    fault(mock_state, stream_cut_probability=1.0, stream_cut_after_chunks=3)
    run = await stream_once(gw)
    assert run.error is None
    assert run.text == REPLY  # one complete answer, not a truncated one and not two
    assert run.stream.continuations == 1 and run.stream.provider == "anthropic"
    # Billed as one answer: the prefix moves back from prompt to completion.
    assert run.usage == {"prompt_tokens": count_tokens(PROMPT), "completion_tokens": count_tokens(REPLY),
                         "total_tokens": count_tokens(PROMPT) + count_tokens(REPLY)}
    assert run.usage and run.chunks[-1]["model"] == "claude-sonnet-4-5"
    assert {c["id"] for c in run.chunks} == {run.stream.id}
    assert sum(1 for c in run.chunks if c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    anthropic = mock_state["anthropic"].stats
    assert anthropic.requests == 1 and anthropic.outcomes["ok"] == 1
    await assert_healthy(gw)


async def test_the_same_deployment_continues_first_when_it_takes_a_prefill(autojump_clock, transport, mock_state):
    profile = {"stream_cut_probability": 0.5, "stream_cut_after_chunks": 2}
    fault(mock_state, **profile, seed=seed_giving(profile, ["stream_cut", None], streaming=True))
    async with open_orchestrator(config(openai_prefill=True), transport=transport) as gw:
        run = await stream_once(gw)
    assert run.error is None and run.text == REPLY
    assert run.stream.provider == "openai" and run.stream.continuations == 1
    assert mock_state["openai"].stats.outcomes == {**mock_state["openai"].stats.outcomes, "stream_cut": 1, "ok": 1}
    assert mock_state["anthropic"].stats.requests == 0


async def test_a_provider_that_keeps_breaking_is_left_for_the_next(autojump_clock, transport, mock_state):
    fault(mock_state, stream_cut_probability=1.0, stream_cut_after_chunks=2)
    async with open_orchestrator(config(openai_prefill=True), transport=transport) as gw:
        run = await stream_once(gw)
        health = await gw.health()
    # Every continuation on openai broke again (each a counted failure) until its circuit
    # opened; anthropic then finished the answer.
    assert run.error is None and run.text == REPLY
    assert run.stream.provider == "anthropic"
    assert health["providers"]["openai"]["circuit"] == "open"


async def test_an_idle_stall_after_commit_fires_at_the_exact_instant(autojump_clock, transport, mock_state):
    fault(mock_state, stream_stall_probability=1.0, stream_fault_after_chunks=2, stream_stall_seconds=60)
    async with open_orchestrator(config(anthropic_prefill=False), transport=transport) as gw:
        start = trio.current_time()
        run = await stream_once(gw)
        assert run.error is not None
        assert run.ended_at - start == pytest.approx(IDLE)
        assert run.text == " ".join(REPLY.split(" ")[:2])  # the two chunks before the stall
        assert "no stream data" in run.error.message
        await trio.testing.wait_all_tasks_blocked()
        assert mock_state["openai"].stats.disconnects == 1
        await assert_healthy(gw)


async def test_a_requester_slower_than_the_provider_is_no_silence(autojump_clock, gw, mock_state):
    chunks = []
    async with gw.stream_chat_completion(REQUEST) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) <= 2:
                await trio.sleep(IDLE + 1)  # the provider's bytes wait unread past the idle timeout
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == REPLY
    assert stream.continuations == 0 and mock_state["anthropic"].stats.requests == 0
    assert mock_state["openai"].stats.requests == 1 and mock_state["openai"].stats.disconnects == 0
    await assert_healthy(gw)


async def test_a_stall_after_commit_is_continued_where_possible(autojump_clock, gw, mock_state):
    fault(mock_state, stream_stall_probability=1.0, stream_fault_after_chunks=2, stream_stall_seconds=60)
    start = trio.current_time()
    run = await stream_once(gw)
    assert run.error is None and run.text == REPLY
    assert run.ended_at - start == pytest.approx(IDLE)


@pytest.mark.parametrize("chunk_delay_ms", [0, 10], ids=["in-the-same-read", "in-a-read-of-its-own"])
async def test_a_malformed_chunk_after_commit_is_continued(autojump_clock, gw, mock_state, chunk_delay_ms):
    # Unpaced, the mock writes the whole stream at once: the chunks before the bad
    # line must still be delivered first, so the break comes after the commit.
    fault(mock_state, malformed_chunk_probability=1.0, stream_fault_after_chunks=4, chunk_delay_ms=chunk_delay_ms)
    run = await stream_once(gw)
    assert run.error is None and run.text == REPLY and run.stream.continuations == 1


async def test_without_a_prefill_deployment_the_break_is_an_honest_error(autojump_clock, transport, mock_state):
    fault(mock_state, stream_cut_probability=1.0, stream_cut_after_chunks=3)
    async with open_orchestrator(config(anthropic_prefill=False), transport=transport) as gw:
        run = await stream_once(gw)
        assert run.error is not None
        assert REPLY.startswith(run.text) and run.text != REPLY
        assert run.error.code == "stream_interrupted"
        assert "ended without finishing" in run.error.message
        assert mock_state["anthropic"].stats.requests == 0
        health = await gw.health()
        assert health["providers"]["openai"]["totals"] == {"transient": 1}
        assert (await stream_once(gw)).error is not None  # and the gateway carries on


async def test_a_failed_continuation_reports_the_original_failure(autojump_clock, gw, mock_state):
    fault(mock_state, stream_cut_probability=1.0, stream_cut_after_chunks=3)
    fault(mock_state, "anthropic", prefill_supported=False)
    run = await stream_once(gw)
    assert run.error is not None
    assert "ended without finishing" in run.error.message
    assert "prefill" not in run.error.message.lower()
    assert mock_state["anthropic"].stats.outcomes["invalid_request"] == 1


# -- cancellation -------------------------------------------------------------------------

async def test_leaving_mid_stream_closes_the_upstream_stream(autojump_clock, gw, mock_state):
    fault(mock_state, chunk_delay_ms=500)
    async with gw.stream_chat_completion(REQUEST) as chunks:
        async for chunk in chunks:
            if chunks.text:
                break
    left = trio.current_time()
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() == left
    assert mock_state["openai"].stats.disconnects == 1
    await assert_healthy(gw)
    assert (await gw.health())["providers"]["openai"]["totals"] == {"cancelled": 1}


# -- over HTTP with the official SDK ----------------------------------------------------------


async def sse_events(client: httpx.AsyncClient, url: str) -> list[bytes]:
    events = []
    async with client.stream("POST", f"{url}/v1/chat/completions", content=orjson.dumps(REQUEST)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = b""
        async for piece in response.aiter_bytes():
            buffer += piece
        events = [event for event in buffer.split(b"\n\n") if event]
    return events


async def test_http_an_interrupted_stream_ends_with_an_error_event_and_no_done(mock_server_url, mock_state, nursery):
    url = await start_gateway(nursery, config(mock_server_url, anthropic_prefill=False))
    fault(mock_state, stream_cut_probability=1.0, stream_cut_after_chunks=3)
    async with httpx.AsyncClient(timeout=10) as client:
        events = await sse_events(client, url)
    assert events[-1].startswith(b"data: {")
    last = orjson.loads(events[-1][len(b"data: "):])
    assert last["error"]["code"] == "stream_interrupted"
    assert all(event != b"data: [DONE]" for event in events)

    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    text = ""
    with pytest.raises(openai.APIError) as caught:
        stream = await sdk.chat.completions.create(model="gpt-4", messages=REQUEST["messages"], stream=True)
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert "interrupted" in caught.value.message
    assert REPLY.startswith(text) and text != REPLY


async def test_http_the_sdk_gets_one_complete_answer_through_a_continuation(mock_server_url, mock_state, nursery):
    url = await start_gateway(nursery, config(mock_server_url))
    fault(mock_state, stream_cut_probability=1.0, stream_cut_after_chunks=3)
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = await sdk.chat.completions.create(
        model="gpt-4", messages=REQUEST["messages"], stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == REPLY
    assert usage.completion_tokens == count_tokens(REPLY)


async def test_http_a_failure_before_commit_is_a_plain_json_error(mock_server_url, mock_state, nursery):
    url = await start_gateway(nursery, config(mock_server_url, retry={"max_attempts": 1}))
    fault(mock_state, "all", stream_cut_probability=1.0, stream_cut_after_chunks=0)
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{url}/v1/chat/completions", content=orjson.dumps(REQUEST))
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "all_providers_failed"


async def test_http_a_client_leaving_mid_stream_closes_the_upstream_within_50ms(mock_server_url, mock_state, nursery):
    url = await start_gateway(nursery, config(mock_server_url))
    fault(mock_state, chunk_delay_ms=200)
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", content=orjson.dumps(REQUEST)) as response:
            async for piece in response.aiter_bytes():
                if b'"content":"' in piece and b'"content":""' not in piece:
                    break
        left = trio.current_time()
    with trio.fail_after(0.05):
        while mock_state["openai"].stats.disconnects == 0:
            await trio.sleep(0.001)
    assert trio.current_time() - left < 0.05


async def test_a_read_cancelled_midway_gives_up_the_call_and_reading_on_continues(autojump_clock, gw, mock_state):
    fault(mock_state, chunk_delay_ms=500)
    async with gw.stream_chat_completion(REQUEST) as stream:
        chunks = [await stream.__anext__(), await stream.__anext__()]  # the role, the first word
        with trio.move_on_after(0.1) as waited:
            await stream.__anext__()  # the next word is 500 ms away
        assert waited.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert mock_state["openai"].stats.disconnects == 1  # the call was given up at once
        chunks += [chunk async for chunk in stream]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == REPLY and stream.continuations == 1  # nothing lost, nothing twice
    health = await gw.health()
    assert health["providers"]["openai"]["totals"] == {"cancelled": 1}  # not the provider's failure
    await assert_healthy(gw)


async def test_a_stream_nobody_reads_gives_its_slot_back_after_the_deadline(autojump_clock, gw, mock_state):
    fault(mock_state, chunk_delay_ms=3000)  # still streaming well past the deadline
    stream = await gw.open_stream(REQUEST, timeout=10)
    try:
        await stream.__anext__()
        await trio.sleep(10 + providers.actor.STREAM_GRACE + 4)  # the requester is stuck elsewhere
        health = await gw.health()
        assert health["providers"]["openai"]["in_flight"] == 0
        assert health["providers"]["openai"]["totals"] == {"cancelled": 1}
        assert mock_state["openai"].stats.disconnects == 1
        with pytest.raises(StreamInterrupted, match="deadline passed before the stream was read"):
            async for _ in stream:
                pass
        assert mock_state["anthropic"].stats.requests == 0  # past the deadline: no continuation
    finally:
        stream.close()
    await assert_healthy(gw)


async def test_closing_from_another_task_mid_read_starts_no_continuation(autojump_clock, gw, mock_state):
    fault(mock_state, chunk_delay_ms=500)
    stream = await gw.open_stream(REQUEST)
    outcome: list[BaseException | None] = []

    async def read_all() -> None:
        try:
            async for _ in stream:
                pass
            outcome.append(None)
        except StreamInterrupted as error:
            outcome.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await trio.sleep(0.6)  # the reader waits for the provider
        stream.close()
    assert isinstance(outcome[0], StreamInterrupted)
    assert mock_state["anthropic"].stats.requests == 0
    await assert_healthy(gw)


async def test_chunks_already_here_come_in_one_batch_with_the_end(autojump_clock, gw):
    async with gw.stream_chat_completion(REQUEST) as chunks:
        await trio.sleep(1)  # the provider runs ahead: its chunks wait, received, unread
        batches = []
        while True:
            try:
                batches.append(await chunks.next_batch())
            except StopAsyncIteration:
                break
            # The end came in the batch: the stream is finished with it, usage chunk last.
            assert chunks.finished
    assert len(batches) == 1  # everything already delivered, in one batch
    pieces = [chunk for batch in batches for chunk in batch]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in pieces if c["choices"])
    assert text == REPLY
    assert pieces[-1]["choices"] == [] and pieces[-1]["usage"]["completion_tokens"] == count_tokens(REPLY)
