"""The provider actor on its own, messaged directly, against the mock app in-process.

No router here: these tests send ``Call`` messages the way the router does and read
the typed outcomes, under the autojump clock so breaker intervals are exact.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from mock_server import open_mock_transport
from mock_server.faults import FaultProfile
from orchestrator.config import Config
from orchestrator.messages import (
    Call,
    Completed,
    ErrorClass,
    Failed,
    Refused,
    Reply,
    RefusalReason,
    StreamEnd,
    StreamOpened,
)
from providers.actor import ADMIT_TOGETHER_BELOW, DRAIN_SECONDS, ActorStopped, ProviderActor
from providers.pool import KEEPALIVE_EXPIRY
from rawserver import serving

BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "hello there"}]}
CONFIG = Config.default()


@pytest.fixture
async def transport(mock_state):
    async with open_mock_transport(mock_state) as transport:
        yield transport


async def start(nursery, transport, name: str = "openai", **options: Any):
    """An actor for provider ``name`` of ``CONFIG``, with ``options`` replacing its settings."""
    provider = attrs.evolve(CONFIG.provider(name), **options)
    return await nursery.start(ProviderActor(provider, transport=transport).run)


async def start_against(nursery, server, **options: Any):
    """An actor for an OpenAI-kind provider served by ``server`` (a raw test server)."""
    provider = Config.from_mapping({
        "providers": {"openai": {"kind": "openai", "base_url": f"{server.url}/v1", **options}},
        "routes": [{"match": "gpt-*", "deployments": [{"provider": "openai"}]}],
    }).provider("openai")
    return await nursery.start(ProviderActor(provider).run)


def call(*, stream: bool = False, deadline: float = 1e9, body: dict[str, Any] = BODY):
    reply = Reply()
    scope = trio.CancelScope()
    return Call("req_test", dict(body), stream, trio.current_time() + deadline, scope, reply), reply


async def ask(actor, **kwargs):
    message, reply = call(**kwargs)
    assert actor.submit(message)
    try:
        return await reply.receive(), message.scope
    finally:
        reply.abandon()


async def test_five_server_errors_open_the_circuit_and_the_sixth_never_arrives(
    autojump_clock, nursery, transport, mock_state
):
    mock_state.configure(FaultProfile(server_error_probability=1.0))
    actor = await start(nursery, transport)
    for _ in range(5):
        outcome, _ = await ask(actor)
        assert isinstance(outcome, Failed) and outcome.error_class is ErrorClass.SERVER_ERROR
    opened_at = trio.current_time()
    sixth, _ = await ask(actor)
    assert sixth == Refused(RefusalReason.CIRCUIT_OPEN, pytest.approx(10.0))
    assert mock_state["openai"].stats.requests == 5  # the sixth never reached the provider
    await trio.sleep(10 - 0.001)
    assert isinstance((await ask(actor))[0], Refused)
    mock_state.configure(FaultProfile())
    await trio.sleep(0.001)
    assert trio.current_time() == pytest.approx(opened_at + 10)
    # Exactly one probe: a second call while the probe is in flight is refused.
    mock_state.configure(FaultProfile(latency_ms=1000))
    async with trio.open_nursery() as probing:
        probe_result = []

        async def probe():
            probe_result.append((await ask(actor))[0])

        probing.start_soon(probe)
        await trio.testing.wait_all_tasks_blocked()
        refused, _ = await ask(actor)
        assert refused.reason is RefusalReason.CIRCUIT_OPEN
    assert isinstance(probe_result[0], Completed)
    snapshot = await actor.snapshot()
    assert snapshot.circuit == "closed" and snapshot.consecutive_failures == 0
    assert snapshot.totals == {"server_error": 5, "circuit_open": 3, "ok": 1}
    assert snapshot.circuit_transitions == 3  # opened, half-open, closed


async def test_a_cancelled_probe_gives_its_slot_back(autojump_clock, nursery, transport, mock_state):
    mock_state.configure(FaultProfile(server_error_probability=1.0))
    actor = await start(nursery, transport)
    for _ in range(5):
        await ask(actor)
    await trio.sleep(10)
    mock_state.configure(FaultProfile(latency_ms=5000))
    message, reply = call()
    assert actor.submit(message)
    await trio.testing.wait_all_tasks_blocked()
    message.scope.cancel()  # the requester gives up on the probe
    await trio.testing.wait_all_tasks_blocked()
    assert (await actor.snapshot()).circuit == "half_open"
    mock_state.configure(FaultProfile())
    outcome, _ = await ask(actor)  # the next call may probe at once
    assert isinstance(outcome, Completed)
    assert (await actor.snapshot()).circuit == "closed"


async def test_rate_limits_refuse_without_a_call_until_retry_after(autojump_clock, nursery, transport, mock_state):
    mock_state.configure(FaultProfile(rate_limit_probability=1.0, retry_after_seconds=3))
    actor = await start(nursery, transport)
    first, _ = await ask(actor)
    assert first.error_class is ErrorClass.RATE_LIMITED and first.retry_after == 3
    second, _ = await ask(actor)
    assert second == Refused(RefusalReason.RATE_LIMITED, pytest.approx(3))
    assert mock_state["openai"].stats.requests == 1
    await trio.sleep(3)
    mock_state.configure(FaultProfile())
    assert isinstance((await ask(actor))[0], Completed)
    assert (await actor.snapshot()).consecutive_failures == 0  # a 429 is not a health failure


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_both_adapters_give_openai_shaped_results(autojump_clock, nursery, transport, provider):
    actor = await start(nursery, transport, provider)
    body = {**BODY, "model": "claude-sonnet-4-5" if provider == "anthropic" else "gpt-4"}
    completed, _ = await ask(actor, body=body)
    assert isinstance(completed, Completed)
    completion = completed.completion
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert set(completion["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}

    opened, _ = await ask(actor, body=body, stream=True)
    assert isinstance(opened, StreamOpened)
    chunks = list(opened.head)
    async for item in opened.chunks:
        chunks.append(item)
    end = chunks.pop()
    assert isinstance(end, StreamEnd) and end.finish_reason == "stop"
    assert end.usage["completion_tokens"] > 0
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == completion["choices"][0]["message"]["content"]


async def test_cancelling_the_requester_stops_the_call_and_counts_nothing(
    autojump_clock, nursery, transport, mock_state
):
    mock_state.configure(FaultProfile(latency_ms=5000))
    actor = await start(nursery, transport)
    message, reply = call()
    assert actor.submit(message)
    await trio.sleep(1)
    message.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert mock_state["openai"].stats.disconnects == 1
    with pytest.raises(trio.EndOfChannel):  # abandoned: no reply, and no hang
        await reply.receive()
    snapshot = await actor.snapshot()
    assert snapshot.in_flight == 0 and snapshot.consecutive_failures == 0
    assert snapshot.totals == {"cancelled": 1}


async def test_cancelling_mid_stream_stops_the_upstream_stream(autojump_clock, nursery, transport, mock_state):
    mock_state.configure(FaultProfile(chunk_delay_ms=100))
    actor = await start(nursery, transport)
    opened, scope = await ask(actor, stream=True)
    assert isinstance(opened, StreamOpened)
    await opened.chunks.receive()
    scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert mock_state["openai"].stats.disconnects == 1
    snapshot = await actor.snapshot()
    assert snapshot.totals == {"cancelled": 1} and snapshot.in_flight == 0


async def test_a_stream_read_yields_to_other_tasks_even_with_its_chunks_at_hand(autojump_clock, nursery, transport):
    actor = await start(nursery, transport)
    opened, _ = await ask(actor, stream=True)
    assert isinstance(opened, StreamOpened)
    await trio.sleep(1)  # the whole stream has arrived
    with trio.testing.assert_checkpoints():
        assert isinstance(await opened.chunks.receive(), dict)
    opened.chunks.close()


class PassCounter(httpx.AsyncBaseTransport):
    """``transport``, noting in ``arrived`` at which pass of the scheduler each request
    reaches it, as counted by ``count`` (run it in a task of its own: it checkpoints
    once a pass)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport
        self.passes = 0
        self.arrived: list[int] = []

    async def count(self) -> None:
        while True:
            await trio.lowlevel.checkpoint()
            self.passes += 1

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.arrived.append(self.passes)
        return await self.transport.handle_async_request(request)


async def test_calls_given_up_while_queued_are_dropped_together(autojump_clock, nursery, transport):
    # Hundreds of clients leaving at once leave their calls in the inbox: the actor drops
    # them all in one pass, not one per pass, so a live call behind them waits no longer.
    counter = PassCounter(transport)
    actor = await start(nursery, counter)
    async with trio.open_nursery() as counting:
        counting.start_soon(counter.count)
        dead = [call() for _ in range(40)]
        for message, _ in dead:
            message.scope.cancel()  # as Router._attempt does when its requester leaves
            assert actor.submit(message)
        live, reply = call()
        assert actor.submit(live)
        submitted = counter.passes
        assert isinstance(await reply.receive(), Completed)
        counting.cancel_scope.cancel()
    assert counter.arrived and counter.arrived[0] - submitted <= 3
    for _, dead_reply in dead:
        with pytest.raises(trio.EndOfChannel):
            await dead_reply.receive()  # closed without a value: nothing was sent


async def test_a_burst_is_admitted_together_until_the_attempts_in_flight_reach_the_bound(
    autojump_clock, nursery, transport, mock_state
):
    # Calls that arrive together start their upstream calls together, up to
    # ADMIT_TOGETHER_BELOW in flight; past it the inbox is the queue, one call a pass.
    mock_state.configure(FaultProfile(latency_ms=10_000))  # every admitted call stays in flight
    counter = PassCounter(transport)
    actor = await start(nursery, counter)
    extra = 5
    async with trio.open_nursery() as counting:
        counting.start_soon(counter.count)
        burst = [call() for _ in range(ADMIT_TOGETHER_BELOW + extra)]
        for message, _ in burst:
            assert actor.submit(message)
        submitted = counter.passes
        while len(counter.arrived) < len(burst) and counter.passes < submitted + 1000:
            await trio.lowlevel.checkpoint()
        counting.cancel_scope.cancel()
    together, queued = counter.arrived[:ADMIT_TOGETHER_BELOW], counter.arrived[ADMIT_TOGETHER_BELOW:]
    # (An attempt reads the pass count in the pass after its admission, before or after
    # the counting task's turn in it: two calls admitted one pass apart may read the same.)
    assert max(together) - submitted <= 3 and max(together) - min(together) <= 1
    assert min(queued) >= max(together) and max(queued) - min(queued) >= extra - 2
    for message, _ in burst:
        message.scope.cancel()


async def test_calls_given_up_while_they_waited_leave_room_for_new_ones(autojump_clock, nursery, transport):
    # Hundreds of clients leave at once and come straight back (an SDK or a load
    # balancer timing out): their dead calls still sit in the inbox when the new ones
    # arrive. Only calls someone still waits for count against the inbox's bound.
    actor = await start(nursery, transport, max_concurrency=64)
    for _ in range(64):
        message, _ = call()
        assert actor.submit(message)
        message.scope.cancel()  # as Router._attempt does when its requester leaves
    live = [call() for _ in range(64)]
    assert all(actor.submit(message) for message, _ in live)  # no pass in between
    assert not actor.submit(call()[0])  # the bound still holds for live calls
    for _, reply in live:
        assert isinstance(await reply.receive(), Completed)


async def test_a_requester_cancelled_while_it_waits_leaves_room_before_its_task_runs(
    autojump_clock, nursery, transport
):
    # Clients leaving cancel their requesters' scopes from the read loop; the calls'
    # own scopes are cancelled only when those requesters next run, and returning
    # clients can get there first. The cancelled wait for the reply is enough, whether
    # the call still waits in the inbox or, admitted with the burst it came in, holds
    # one of the provider's slots (given back at once when the limit is reached).
    actor = await start(nursery, transport, max_concurrency=64)
    submitted = 0

    async def requester() -> None:
        nonlocal submitted
        message, reply = call()
        assert actor.submit(message)
        submitted += 1
        try:
            await reply.receive()
        finally:  # as Router._attempt does
            reply.abandon()
            message.scope.cancel()

    async with trio.open_nursery() as leaving:
        for _ in range(64):
            leaving.start_soon(requester)
        while submitted < 64:
            await trio.lowlevel.checkpoint()
        leaving.cancel_scope.cancel()  # the actor has admitted them together meanwhile
        returning = [call() for _ in range(64)]
        assert all(actor.submit(message) for message, _ in returning)  # before they run
    for _, reply in returning:
        assert isinstance(await reply.receive(), Completed)


async def test_slots_of_calls_given_up_are_free_for_new_calls_before_their_attempts_end(
    autojump_clock, nursery, transport, mock_state
):
    # The requesters have stopped waiting but not yet run again to cancel their calls,
    # so the attempts still hold the provider's two slots, and will until then.
    mock_state.configure(FaultProfile(latency_ms=1000))
    actor = await start(nursery, transport, max_concurrency=2)
    until_new_calls_are_answered = trio.Event()

    async def requester(task_status=trio.TASK_STATUS_IGNORED) -> None:
        message, reply = call()
        assert actor.submit(message)
        with trio.CancelScope() as waiting:
            task_status.started(waiting)
            try:
                await reply.receive()
            finally:
                with trio.CancelScope(shield=True):
                    await until_new_calls_are_answered.wait()
                reply.abandon()
                message.scope.cancel()

    async with trio.open_nursery() as leaving:
        try:
            waits = [await leaving.start(requester) for _ in range(2)]
            await trio.sleep(0.5)  # both admitted, both waiting for the provider
            assert (await actor.snapshot()).in_flight == 2
            for waiting in waits:
                waiting.cancel()
            await trio.testing.wait_all_tasks_blocked()
            new = [call() for _ in range(2)]
            assert all(actor.submit(message) for message, _ in new)
            outcomes = [await reply.receive() for _, reply in new]
        finally:
            until_new_calls_are_answered.set()
    assert all(isinstance(outcome, Completed) for outcome in outcomes)  # not refused as saturated
    snapshot = await actor.snapshot()
    assert snapshot.in_flight == 0 and snapshot.totals == {"cancelled": 2, "ok": 2}


async def test_a_call_taken_from_the_inbox_as_the_actor_stops_is_answered(autojump_clock, transport):
    # The actor takes the next live call before its checkpoint; stopping there must end
    # that call's wait as it ends the queued ones', not leave it to its deadline.
    async with trio.open_nursery() as nursery:
        actor = await start(nursery, transport)
        await trio.testing.wait_all_tasks_blocked()  # the actor waits on its inbox
        (first, _), (second, second_reply) = call(), call()
        assert actor.submit(first) and actor.submit(second)
        nursery.cancel_scope.cancel()  # the actor wakes with the first, and stops
    with trio.fail_after(1), pytest.raises(trio.EndOfChannel):
        await second_reply.receive()


async def test_saturation_refuses_at_once(autojump_clock, nursery, transport, mock_state):
    mock_state.configure(FaultProfile(latency_ms=1000))
    actor = await start(nursery, transport, max_concurrency=1)
    first, _ = call()
    assert actor.submit(first)
    await trio.testing.wait_all_tasks_blocked()
    refused, _ = await ask(actor)
    assert refused == Refused(RefusalReason.SATURATED, None)


async def test_an_adapter_that_trips_on_a_request_fails_the_attempt_not_the_actor(autojump_clock, nursery, transport):
    from providers.openai import OpenAIAdapter

    class Tripping(OpenAIAdapter):
        def request(self, body, *, stream):
            if body.get("user") == "trip":
                raise TypeError("an adapter bug")
            return super().request(body, stream=stream)

    config = CONFIG.provider("openai")
    actor = await nursery.start(ProviderActor(config, adapter=Tripping(config), transport=transport).run)
    tripped, _ = await ask(actor, body={**BODY, "user": "trip"})
    assert tripped.error_class is ErrorClass.UNSUPPORTED
    assert "could not translate" in tripped.message
    fine, _ = await ask(actor)
    assert isinstance(fine, Completed)


async def test_a_stopped_actor_fails_callers_at_once(autojump_clock, transport):
    async with trio.open_nursery() as nursery:
        actor = await start(nursery, transport)
        nursery.cancel_scope.cancel()
    with pytest.raises(ActorStopped):
        actor.submit(call()[0])
    with pytest.raises(ActorStopped):
        await actor.snapshot()


# -- the one-shot reply ---------------------------------------------------------------


async def test_a_reply_wakes_its_waiter_with_the_value(autojump_clock, nursery):
    reply: Reply[str] = Reply()
    got = []

    async def wait() -> None:
        got.append(await reply.receive())

    nursery.start_soon(wait)
    await trio.testing.wait_all_tasks_blocked()
    assert got == []
    with reply:
        reply.send_nowait("answer")
    await trio.testing.wait_all_tasks_blocked()
    assert got == ["answer"]
    with pytest.raises(trio.ClosedResourceError):
        reply.send_nowait("twice")


async def test_a_reply_closed_without_a_value_ends_the_wait(autojump_clock, nursery):
    reply: Reply[str] = Reply()
    ended = []

    async def wait() -> None:
        with pytest.raises(trio.EndOfChannel):
            await reply.receive()
        ended.append(True)

    nursery.start_soon(wait)
    await trio.testing.wait_all_tasks_blocked()
    reply.close()
    await trio.testing.wait_all_tasks_blocked()
    assert ended == [True]
    with pytest.raises(trio.EndOfChannel):
        await reply.receive()  # and so does a later receive


async def test_a_cancelled_receive_leaves_the_reply_usable(autojump_clock):
    reply: Reply[str] = Reply()
    assert not reply.receive_cancelled
    with trio.move_on_after(1):
        await reply.receive()
    assert reply.receive_cancelled  # what tells the actor the call is given up
    reply.send_nowait("late")
    assert await reply.receive() == "late"


async def test_an_abandoned_reply_refuses_a_late_value(autojump_clock):
    reply: Reply[str] = Reply()
    reply.abandon()
    with pytest.raises(trio.BrokenResourceError):
        reply.send_nowait("nobody listens")


# -- a finished stream's connection goes back to the pool ------------------------------

SSE_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"


def sse_chunk(data: bytes) -> bytes:
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


ANSWER = sse_chunk(
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}'
) + sse_chunk(b"[DONE]")


async def stream_through(actor) -> list[Any]:
    opened, _ = await ask(actor, stream=True)
    assert isinstance(opened, StreamOpened)
    return [item async for item in opened.chunks]


@pytest.mark.parametrize(("terminated", "connections"), [(True, 1), (False, 2)],
                         ids=["body ends after [DONE]", "body never ends"])
async def test_a_finished_streams_connection_is_kept_only_if_its_body_ends(nursery, terminated, connections):
    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(SSE_HEAD + ANSWER + (b"0\r\n\r\n" if terminated else b""))

    async with serving(answer) as server:
        actor = await start_against(nursery, server)
        for _ in range(2):
            started = trio.current_time()
            items = await stream_through(actor)
            # The requester has the whole answer either way, without waiting for the drain.
            assert isinstance(items[-1], StreamEnd)
            assert trio.current_time() - started < DRAIN_SECONDS
        assert server.connections == connections
        await trio.sleep(DRAIN_SECONDS * 2)  # a drain that waits in vain gives up, and settles
        assert (await actor.snapshot()).totals == {"ok": 2}


async def test_a_kept_alive_connection_closed_under_a_request_is_no_failure_and_is_counted(nursery):
    # Each connection's second request is met with a close, as when the provider's idle
    # timeout crosses the reuse: the answer comes on a new connection, in the same attempt.
    served: dict[trio.SocketStream, int] = {}

    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        served[stream] = served.get(stream, 0) + 1
        if served[stream] == 2:
            await stream.aclose()
        else:
            await stream.send_all(SSE_HEAD + ANSWER + b"0\r\n\r\n")

    async with serving(answer) as server:
        actor = await start_against(nursery, server)
        for _ in range(2):
            assert isinstance((await stream_through(actor))[-1], StreamEnd)
        snapshot = await actor.snapshot()
        assert snapshot.totals == {"ok": 2, "connections_replaced": 1}
        assert snapshot.consecutive_failures == 0
        assert server.connections == 2


async def test_a_quiet_providers_idle_connections_are_closed_after_the_keep_alive_expiry(autojump_clock, nursery):
    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(SSE_HEAD + ANSWER + b"0\r\n\r\n")

    async with serving(answer) as server:
        actor = await start_against(nursery, server)
        async with trio.open_nursery() as burst:
            for _ in range(3):
                burst.start_soon(stream_through, actor)
        assert server.open_connections == 3  # kept for reuse
        await trio.sleep(KEEPALIVE_EXPIRY / 2)
        assert server.open_connections == 3
        await trio.sleep(KEEPALIVE_EXPIRY * 2)
        with trio.fail_after(5):
            while server.open_connections:  # our closes land
                await trio.sleep(0.01)
        assert isinstance((await stream_through(actor))[-1], StreamEnd)
        assert server.connections == 4


async def test_a_draining_stream_no_longer_counts_as_in_flight(nursery):
    # A provider that leaves its body open after [DONE]: the drain waits DRAIN_SECONDS.
    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(SSE_HEAD + ANSWER)

    async with serving(answer) as server:
        actor = await start_against(nursery, server, max_concurrency=1)
        for count in (1, 2):
            started = trio.current_time()
            items = await stream_through(actor)  # the second is admitted, not refused as saturated
            assert isinstance(items[-1], StreamEnd)
            snapshot = await actor.snapshot()
            assert trio.current_time() - started < DRAIN_SECONDS  # still draining...
            assert snapshot.in_flight == 0 and snapshot.totals == {"ok": count}  # ...and settled


async def test_a_stream_silent_before_its_first_token_is_a_failed_attempt_at_the_timeout(
    autojump_clock, nursery, transport, mock_state
):
    mock_state.configure(FaultProfile(slow_first_token_probability=1.0, first_token_delay_seconds=60))
    actor = await start(nursery, transport)
    timeout = CONFIG.provider("openai").timeouts.first_token
    started = trio.current_time()
    failed, _ = await ask(actor, stream=True)
    assert isinstance(failed, Failed)
    assert failed.error_class is ErrorClass.SILENT and failed.status == 200  # the head had come
    assert "no stream data" in failed.message
    assert trio.current_time() - started == pytest.approx(timeout)


async def test_an_answer_later_than_the_attempt_timeout_is_silence_at_that_instant(
    autojump_clock, nursery, transport, mock_state
):
    attempt = CONFIG.provider("openai").timeouts.attempt
    mock_state.configure(FaultProfile(latency_ms=int(attempt * 1000) + 5000))
    actor = await start(nursery, transport)
    started = trio.current_time()
    outcome, scope = await ask(actor)
    assert trio.current_time() == pytest.approx(started + attempt)
    assert isinstance(outcome, Failed) and outcome.error_class is ErrorClass.SILENT
    assert outcome.message == "no response within the provider's timeout"
    assert outcome.elapsed == pytest.approx(attempt)
    assert (await actor.snapshot()).consecutive_failures == 1  # silence counts against it
    # The request's deadline, when it comes first, is the request's: no provider failure.
    outcome, _ = await ask(actor, deadline=attempt / 2)
    assert isinstance(outcome, Failed) and outcome.error_class is ErrorClass.DEADLINE
    assert outcome.message == "no response before the request's deadline"
    assert (await actor.snapshot()).consecutive_failures == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_body_its_content_encoding_does_not_decode_is_malformed_not_a_crash(nursery, stream):
    garbage = b"this is not gzip"
    content_type = b"text/event-stream" if stream else b"application/json"

    async def answer(socket: trio.SocketStream, request: bytes) -> None:
        await socket.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%b"
            % (content_type, len(garbage), garbage)
        )

    async with serving(answer) as server:
        actor = await start_against(nursery, server)
        for _ in range(2):  # and the actor is still there to take the next call
            outcome, _ = await ask(actor, stream=stream)
            assert isinstance(outcome, Failed) and outcome.error_class is ErrorClass.MALFORMED
            assert outcome.status == (200 if stream else None)
        assert (await actor.snapshot()).totals == {"malformed": 2}


class AttemptExits(trio.abc.Instrument):
    """Counts the actor's attempt tasks that have ended."""

    def __init__(self) -> None:
        self.count = 0

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("ProviderActor._attempt"):
            self.count += 1


@pytest.mark.parametrize("fault", [
    FaultProfile(),
    FaultProfile(server_error_probability=1.0),
    FaultProfile(latency_ms=int(CONFIG.provider("openai").timeouts.attempt * 1000) + 5000),
], ids=["answer", "server_error", "silence"])
async def test_a_json_attempt_has_ended_when_its_reply_is_read(autojump_clock, nursery, transport, mock_state, fault):
    # The router does not cancel a json call's scope once it has the reply
    # (Router._attempt): that is only right while the attempt replies as its last act,
    # with no checkpoint after. Were there one, the requester would run first about
    # half the time (trio reverses each batch of runnable tasks at random), so ten
    # calls would catch it.
    mock_state.configure(fault)
    actor = await start(nursery, transport, breaker=attrs.evolve(CONFIG.provider("openai").breaker,
                                                                 failure_threshold=100))
    exits = AttemptExits()
    trio.lowlevel.add_instrument(exits)
    try:
        for count in range(1, 11):
            message, reply = call()
            assert actor.submit(message)
            outcome = await reply.receive()
            assert exits.count == count, outcome
    finally:
        trio.lowlevel.remove_instrument(exits)


async def test_a_circuit_that_opens_says_what_the_last_failure_was(autojump_clock, nursery, transport, mock_state,
                                                                  caplog):
    mock_state.configure(FaultProfile(server_error_probability=1.0))
    actor = await start(nursery, transport)
    with caplog.at_level(logging.WARNING, logger="providers.actor"):
        for _ in range(5):
            outcome, _ = await ask(actor)
            assert isinstance(outcome, Failed)
    [opened] = [record.getMessage() for record in caplog.records if "OPENED" in record.getMessage()]
    assert opened.startswith("circuit for openai OPENED after 5 consecutive failures, for 10.0s; last failure: server_error: ")
    assert opened.endswith(outcome.message)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_bug_in_an_attempt_fails_that_call_not_the_actor(nursery, stream, caplog):
    class Broken(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise RuntimeError("a bug")

    actor = await nursery.start(ProviderActor(CONFIG.provider("openai"), transport=Broken()).run)
    for _ in range(2):
        outcome, _ = await ask(actor, stream=stream)
        assert isinstance(outcome, Failed) and outcome.error_class is ErrorClass.TRANSIENT
        assert outcome.message == "the gateway failed while calling openai"
    assert (await actor.snapshot()).totals == {"transient": 2}
    assert "an attempt failed inside the gateway" in caplog.text and "RuntimeError: a bug" in caplog.text


async def test_an_answer_too_large_to_read_whole_is_malformed(nursery):
    async def answer(socket: trio.SocketStream, request: bytes) -> None:
        await socket.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 99999999999\r\n\r\n")

    async with serving(answer) as server:
        actor = await start_against(nursery, server)
        with trio.fail_after(5):
            outcome, _ = await ask(actor)
        assert isinstance(outcome, Failed) and outcome.error_class is ErrorClass.MALFORMED
        assert outcome.message == "response body too large"
