"""The router's behaviour table, with exact times under trio's autojump mock clock.

Upstreams are scripted per host (see ``scripted.py``); the seed fixes the backoff
jitter, so every wait is known in advance and asserted to the microsecond.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from orchestrator.backoff import backoff_delay
from orchestrator.config import RetryPolicy
from orchestrator.errors import (
    AllProvidersFailed,
    DeadlineExceeded,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamClientError,
)
from orchestrator.service import open_orchestrator
from scripted import OK, REQUEST, RESET, ScriptedUpstream, error, stall, two_provider_config


@pytest.fixture
def upstream():
    return ScriptedUpstream()


def waits(count: int, seed: int = 1, policy: RetryPolicy = RetryPolicy()) -> list[float]:
    rng = random.Random(seed)
    return [backoff_delay(n, policy, rng) for n in range(1, count + 1)]


async def test_timeouts_are_retried_with_growing_waits_then_succeed(autojump_clock, upstream):
    # The seed's scenario 2: the provider stalls 3 s and answers 504, twice; then succeeds.
    upstream.script("primary", stall(3, error(504)), stall(3, error(504)), OK)
    w1, w2 = waits(2)
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
    assert completion.provider == "primary"
    assert [a.outcome for a in completion.attempts] == ["timeout", "timeout", "ok"]
    assert upstream.calls("primary") == pytest.approx([start, start + 3 + w1, start + 6 + w1 + w2])
    assert 2.0 <= w1 <= 2.5 and 4.0 <= w2 <= 5.0
    assert upstream.calls("backup") == []


async def test_retries_exhausted_then_failover(autojump_clock, upstream):
    upstream.script("primary", error(500), error(502), error(503))
    w1, w2 = waits(2)
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
    assert completion.provider == "backup"
    assert [(a.provider, a.outcome) for a in completion.attempts] == [
        ("primary", "server_error"), ("primary", "server_error"), ("primary", "server_error"), ("backup", "ok")]
    assert upstream.calls("backup") == pytest.approx([start + w1 + w2])


async def test_rate_limit_fails_over_at_once_and_marks_the_provider(autojump_clock, upstream):
    upstream.script("primary", error(429, retry_after="7"))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
        assert completion.provider == "backup"
        assert upstream.calls("backup") == [start]
        health = await gw.health()
        assert health["providers"]["primary"]["rate_limited"] is True
        assert health["providers"]["primary"]["rate_limited_for_seconds"] == pytest.approx(7)
        assert health["providers"]["primary"]["circuit"] == "closed"
        # While limited, the provider is skipped without a call.
        again = await gw.chat_completion(REQUEST)
        assert again.provider == "backup"
        assert [a.outcome for a in again.attempts] == ["rate_limited", "ok"]
        assert len(upstream.calls("primary")) == 1
        await trio.sleep(7)
        third = await gw.chat_completion(REQUEST)
        assert third.provider == "primary"


async def test_silence_fails_over_at_once_after_the_attempt_timeout(autojump_clock, upstream):
    upstream.script("primary", stall(100))
    config = two_provider_config(provider={"attempt_timeout_seconds": 5})
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
    assert completion.provider == "backup"
    assert upstream.calls("backup") == pytest.approx([start + 5])
    assert upstream.cancelled == [(pytest.approx(start + 5), "primary")]
    assert completion.attempts[0].outcome == "timeout"


async def test_silence_on_the_last_deployment_is_retried(autojump_clock, upstream):
    upstream.script("primary", error(401))
    upstream.script("backup", stall(100), OK)
    config = two_provider_config(provider={"attempt_timeout_seconds": 5})
    (w1,) = waits(1)
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
    assert completion.provider == "backup"
    assert upstream.calls("backup") == pytest.approx([start, start + 5 + w1])


async def test_retry_after_on_a_server_error_sets_the_wait(autojump_clock, upstream):
    upstream.script("primary", error(503, retry_after="1.25"))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
    assert completion.provider == "primary"
    assert upstream.calls("primary") == pytest.approx([start, start + 1.25])


async def test_connection_reset_is_transient(autojump_clock, upstream):
    upstream.script("primary", RESET)
    (w1,) = waits(1)
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
    assert [a.outcome for a in completion.attempts] == ["connection_error", "ok"]
    assert upstream.calls("primary") == pytest.approx([start, start + w1])


async def test_one_deadline_covers_every_attempt_and_wait(autojump_clock, upstream):
    upstream.script("primary", stall(3, error(504)), stall(3, error(504)), stall(3, error(504)))
    upstream.script("backup", stall(3, error(504)), stall(3, error(504)))
    w1, w2 = waits(2)
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        with pytest.raises(DeadlineExceeded) as caught:
            await gw.chat_completion(REQUEST, timeout=10)
        elapsed = trio.current_time() - start
    # 3 s + w1 (2.x) + 3 s = 8.x s spent; the 4.x s wait does not fit in what is left,
    # so it fails over to backup at once, whose attempt is cut by the deadline at 10 s.
    assert upstream.calls("backup") == pytest.approx([start + 6 + w1])
    assert elapsed == pytest.approx(10)
    assert caught.value.status == 504
    assert [a.outcome for a in caught.value.attempts] == ["timeout", "timeout", "deadline"]
    assert not caught.value.should_retry


async def test_a_wait_that_does_not_fit_is_never_started(autojump_clock, upstream):
    upstream.script("backup", error(500))
    config = two_provider_config(routes=[{"match": "gpt-*", "deployments": [{"provider": "backup"}]}])
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        start = trio.current_time()
        with pytest.raises(DeadlineExceeded) as caught:
            await gw.chat_completion(REQUEST, timeout=1.5)
        assert trio.current_time() == pytest.approx(start)  # did not sleep 2 s into a 1.5 s budget
    # Not "spent": it says what was left and why that was not enough.
    assert caught.value.message.startswith("The request's deadline of 1.5s had 1.50s left after 1 attempt: "
                                           "too little for the 2.")
    assert caught.value.retry_after is None  # the wait was the gateway's backoff


async def test_a_providers_retry_after_that_does_not_fit_is_passed_on(autojump_clock, upstream):
    upstream.script("backup", error(503, retry_after="100"))
    config = two_provider_config(routes=[{"match": "gpt-*", "deployments": [{"provider": "backup"}]}])
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        with pytest.raises(DeadlineExceeded) as caught:
            await gw.chat_completion(REQUEST, timeout=60)
    assert "too little for the 100.00s wait before another that the provider asked for" in caught.value.message
    assert caught.value.response_headers()["retry-after"] == "100"


async def test_a_deadline_cut_is_not_held_against_the_provider(autojump_clock, upstream):
    upstream.script("primary", stall(100))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        with pytest.raises(DeadlineExceeded):
            await gw.chat_completion(REQUEST, timeout=2)
        health = await gw.health()
    assert health["providers"]["primary"]["consecutive_failures"] == 0
    assert health["providers"]["primary"]["totals"] == {"deadline": 1}


async def test_all_rate_limited_waits_for_the_earliest_when_it_fits(autojump_clock, upstream):
    upstream.script("primary", error(429, retry_after="4"))
    upstream.script("backup", error(429, retry_after="2"))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST)
    assert completion.provider == "backup"
    assert upstream.calls("backup") == pytest.approx([start, start + 2])
    # primary was still limited in the second round: skipped without a call
    assert upstream.calls("primary") == [start]


async def test_rate_limits_are_waited_out_for_as_long_as_the_deadline_allows(autojump_clock, upstream):
    upstream.script("primary", *[error(429, retry_after="1")] * 6)
    upstream.script("backup", *[error(429, retry_after="1")] * 6)
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        completion = await gw.chat_completion(REQUEST, timeout=30)
    # Six rounds of 429s a second apart, then the seventh round is answered.
    assert completion.provider == "primary"
    assert upstream.calls("primary") == pytest.approx([start + n for n in range(7)])
    assert [a.outcome for a in completion.attempts].count("rate_limit") == 12


async def test_all_rate_limited_beyond_the_deadline_is_429_with_retry_after(autojump_clock, upstream):
    upstream.script("primary", error(429, retry_after="30"))
    upstream.script("backup", error(429, retry_after="20"))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        with pytest.raises(RateLimited) as caught:
            await gw.chat_completion(REQUEST, timeout=5)
    assert caught.value.status == 429
    assert caught.value.retry_after == 20
    assert [a.outcome for a in caught.value.attempts] == ["rate_limit", "rate_limit"]


async def test_the_circuit_opens_after_five_failures_and_probes_after_its_interval(autojump_clock, upstream):
    upstream.script("primary", *[error(500)] * 5)
    config = two_provider_config(retry={"max_attempts": 1})
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        for _ in range(5):
            assert (await gw.chat_completion(REQUEST)).provider == "backup"
        opened_at = trio.current_time()
        health = await gw.health()
        assert health["providers"]["primary"]["circuit"] == "open"
        assert health["providers"]["primary"]["open_for_seconds"] == pytest.approx(10)
        sixth = await gw.chat_completion(REQUEST)
        assert [a.outcome for a in sixth.attempts] == ["circuit_open", "ok"]
        assert len(upstream.calls("primary")) == 5  # the sixth never reached it
        await trio.sleep(9.999)
        assert (await gw.chat_completion(REQUEST)).provider == "backup"
        await trio.sleep(0.001)
        probe = await gw.chat_completion(REQUEST)
        assert probe.provider == "primary"
        assert upstream.calls("primary")[-1] == pytest.approx(opened_at + 10)
        assert (await gw.health())["providers"]["primary"]["circuit"] == "closed"


async def test_client_errors_pass_through_without_retry_or_failover(autojump_clock, upstream):
    upstream.script("primary", error(400, "bad tool schema", code="invalid_schema"))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        with pytest.raises(UpstreamClientError) as caught:
            await gw.chat_completion(REQUEST)
    assert caught.value.status == 400
    assert caught.value.as_json()["error"]["message"] == "bad tool schema"
    assert caught.value.as_json()["error"]["code"] == "invalid_schema"
    assert upstream.calls("backup") == []


async def test_context_too_long_falls_back_without_retry(autojump_clock, upstream):
    upstream.script("primary", error(400, "too many tokens", code="context_length_exceeded"))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        completion = await gw.chat_completion(REQUEST)
        health = await gw.health()
    assert completion.provider == "backup"
    assert len(upstream.calls("primary")) == 1
    assert health["providers"]["primary"]["consecutive_failures"] == 0


async def test_everything_failing_is_502_listing_the_attempts(autojump_clock, upstream):
    upstream.script("primary", error(500), error(500), error(500))
    upstream.script("backup", error(401), error(401))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        with pytest.raises(AllProvidersFailed) as caught:
            await gw.chat_completion(REQUEST)
    body = caught.value.as_json()["error"]
    assert caught.value.status == 502
    assert [(a["provider"], a["outcome"]) for a in body["attempts"]] == [
        ("primary", "server_error"), ("primary", "server_error"), ("primary", "server_error"),
        ("backup", "misconfigured")]
    assert body["request_id"].startswith("req_")


async def test_open_circuits_everywhere_is_503_with_retry_after(autojump_clock, upstream):
    config = two_provider_config(retry={"max_attempts": 1}, provider={"breaker": {"failure_threshold": 1}})
    upstream.script("primary", error(500))
    upstream.script("backup", error(500))
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        with pytest.raises(AllProvidersFailed):
            await gw.chat_completion(REQUEST)
        await trio.sleep(3)
        with pytest.raises(ServiceUnavailable) as caught:
            await gw.chat_completion(REQUEST)
    assert caught.value.status == 503
    assert caught.value.retry_after == 7
    assert [a.outcome for a in caught.value.attempts] == ["circuit_open", "circuit_open"]


async def test_unknown_model_fails_before_any_call(autojump_clock, upstream):
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        with pytest.raises(ModelNotFound) as caught:
            await gw.chat_completion({**REQUEST, "model": "llama-3"})
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert upstream.received == []


async def test_cancelling_the_caller_cancels_the_upstream_call_and_counts_nothing(autojump_clock, upstream):
    upstream.script("primary", stall(100))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        start = trio.current_time()
        with trio.move_on_after(1):
            await gw.chat_completion(REQUEST)
        await trio.testing.wait_all_tasks_blocked()
        health = await gw.health()
    assert upstream.cancelled == [(pytest.approx(start + 1), "primary")]
    assert health["providers"]["primary"]["in_flight"] == 0
    assert health["providers"]["primary"]["consecutive_failures"] == 0
    assert health["providers"]["primary"]["totals"] == {"cancelled": 1}


async def test_cancelling_during_a_backoff_wait(autojump_clock, upstream):
    upstream.script("primary", error(500))
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        with trio.move_on_after(1):
            await gw.chat_completion(REQUEST)
        assert gw.in_flight == 0
    assert len(upstream.calls("primary")) == 1


async def test_a_full_provider_sheds_to_the_next_then_503(autojump_clock, upstream):
    config = two_provider_config(provider={"max_concurrency": 1})
    upstream.script("primary", stall(10))
    upstream.script("backup", stall(10))
    results = []
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        async def one():
            try:
                results.append((await gw.chat_completion(REQUEST)).provider)
            except ServiceUnavailable as error:
                results.append(error.status)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
                await trio.testing.wait_all_tasks_blocked()
    assert sorted(map(str, results)) == ["503", "backup", "primary"]


async def test_a_gateway_in_flight_limit_sheds_at_once(autojump_clock, upstream):
    config = two_provider_config(max_in_flight=1)
    upstream.script("primary", stall(10))
    async with open_orchestrator(config, transport=upstream.transport) as gw:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.chat_completion, REQUEST)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ServiceUnavailable) as caught:
                await gw.chat_completion(REQUEST)
            assert caught.value.retry_after == 1
        assert gw.in_flight == 0


async def test_request_ids_are_kept_when_sane(autojump_clock, upstream):
    async with open_orchestrator(two_provider_config(), transport=upstream.transport) as gw:
        assert (await gw.chat_completion(REQUEST, request_id="client-id.42")).request_id == "client-id.42"
        assert (await gw.chat_completion(REQUEST, request_id="bad id\n")).request_id.startswith("req_")
        assert (await gw.chat_completion(REQUEST, request_id="x" * 500)).request_id.startswith("req_")


async def test_a_dead_actor_fails_the_service_loudly(autojump_clock, upstream):
    upstream.script("primary", stall(100))
    config = two_provider_config()
    with pytest.raises(BaseExceptionGroup) as caught:
        async with open_orchestrator(config, transport=upstream.transport) as gw:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gw.chat_completion, REQUEST)
                await trio.testing.wait_all_tasks_blocked()
                # A message the actor cannot handle kills its loop.
                gw._actors["primary"]._inbox.send_nowait(object())
                await trio.sleep(1000)
    assert caught.value.subgroup(AttributeError) is not None
    # The stalled upstream call was cancelled with the actor, not left behind.
    assert [host for _, host in upstream.cancelled] == ["primary"]
