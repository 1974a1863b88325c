"""The seed's five scenarios and the OpenAI SDK, end to end over loopback sockets.

The mock and the gateway run in the test's trio run on free ports; requests use the
seed's exact bodies with curl's content type (or none). The mock's ``/stats`` is the
witness of what reached each provider. Real time here, so the mock's stalls and the
gateway's backoff are shortened through configuration only.
"""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
import trio

from gateway_fixtures import CURL_FORM, SEED_BODY, SEED_BODY_MULTILINE, demo_config, seed_giving, start_gateway


@pytest.fixture
async def gateway_url(mock_server_url, nursery):
    # Backoff shortened from 2 s, but long enough that in scenario 4 every first attempt
    # has failed (and the circuit opened) before any retry is due, even on a busy machine.
    return await start_gateway(nursery, demo_config(mock_server_url, backoff=0.3))


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def configure_mock(client: httpx.AsyncClient, mock_url: str, body: bytes) -> None:
    response = await client.post(f"{mock_url}/config/failures", content=body, headers=CURL_FORM)
    assert response.status_code == 200, response.text


async def stats(client: httpx.AsyncClient, mock_url: str) -> dict:
    return (await client.get(f"{mock_url}/stats")).json()


async def test_health(client, gateway_url):
    response = await client.get(f"{gateway_url}/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert set(body["providers"]) == {"openai", "anthropic"}
    assert body["providers"]["openai"]["circuit"] == "closed"
    assert response.headers["x-request-id"]


async def test_scenario_1_normal_success(client, mock_server_url, gateway_url, caplog):
    caplog.set_level(logging.INFO, "orchestrator")
    await configure_mock(client, mock_server_url, b"{}")
    response = await client.post(f"{gateway_url}/v1/chat/completions", content=SEED_BODY_MULTILINE, headers=CURL_FORM)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4"
    assert body["choices"][0]["message"]["content"]
    assert response.headers["x-orchestrator-provider"] == "openai"
    assert response.headers["x-orchestrator-attempts"] == "1"
    request_id = response.headers["x-request-id"]
    witnessed = await stats(client, mock_server_url)
    assert witnessed["openai"]["requests"] == 1 and witnessed["anthropic"]["requests"] == 0
    journey = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    assert [r.event for r in journey] == ["accepted", "attempt", "done"]


async def test_scenario_2_timeouts_are_retried_with_growing_waits(client, mock_server_url, gateway_url, mock_state,
                                                                  caplog):
    caplog.set_level(logging.INFO, "orchestrator")
    # The seed's body, with the stall shortened to keep the test fast.
    body = {"timeout_probability": 0.7, "timeout_duration_seconds": 0.2}
    mock_state["openai"].rng.seed(seed_giving(body, ["timeout", "timeout", None]))
    await configure_mock(client, mock_server_url, b'{"timeout_probability":0.7,"timeout_duration_seconds":0.2}')
    start = trio.current_time()
    response = await client.post(f"{gateway_url}/v1/chat/completions", content=SEED_BODY, headers=CURL_FORM)
    elapsed = trio.current_time() - start
    assert response.status_code == 200
    assert response.headers["x-orchestrator-provider"] == "openai"
    assert response.headers["x-orchestrator-attempts"] == "3"
    witnessed = await stats(client, mock_server_url)
    assert witnessed["openai"]["outcomes"]["timeout"] == 2 and witnessed["openai"]["outcomes"]["ok"] == 1
    assert witnessed["anthropic"]["requests"] == 0
    waits = [r.fields["wait_seconds"] for r in caplog.records if getattr(r, "event", None) == "backoff"]
    assert len(waits) == 2 and waits[1] > waits[0]
    assert elapsed >= 0.4 + sum(waits)


async def test_scenario_3_rate_limit_fails_over(client, mock_server_url, gateway_url):
    await configure_mock(client, mock_server_url, b'{\n  "rate_limit_probability":1.0\n}')
    response = await client.post(f"{gateway_url}/v1/chat/completions", content=SEED_BODY, headers=CURL_FORM)
    assert response.status_code == 200
    assert response.headers["x-orchestrator-provider"] == "anthropic"
    assert response.headers["x-orchestrator-attempts"] == "2"
    assert response.json()["model"].startswith("claude-")
    witnessed = await stats(client, mock_server_url)
    assert witnessed["openai"]["requests"] == 1 and witnessed["openai"]["outcomes"]["rate_limit"] == 1
    assert witnessed["anthropic"]["outcomes"]["ok"] == 1


async def test_scenario_4_circuit_breaker(client, mock_server_url, gateway_url):
    await configure_mock(client, mock_server_url, b'{\n  "server_error_probability":1.0\n}')
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(
            await client.post(f"{gateway_url}/v1/chat/completions", content=SEED_BODY, headers=CURL_FORM)
        )

    async with trio.open_nursery() as nursery:
        for _ in range(7):
            nursery.start_soon(one)
    assert [r.status_code for r in responses] == [200] * 7
    assert {r.headers["x-orchestrator-provider"] for r in responses} == {"anthropic"}
    health = (await client.get(f"{gateway_url}/health")).json()
    assert health["providers"]["openai"]["circuit"] == "open"
    witnessed = await stats(client, mock_server_url)
    reached_openai = witnessed["openai"]["requests"]
    # At least the five failures that opened it; at most one per request: the retries
    # after the backoff found the circuit open and never reached openai.
    assert 5 <= reached_openai <= 7
    assert witnessed["openai"]["outcomes"]["server_error"] == reached_openai
    later = await client.post(f"{gateway_url}/v1/chat/completions", content=SEED_BODY, headers=CURL_FORM)
    assert later.status_code == 200
    assert later.headers["x-orchestrator-provider"] == "anthropic"
    assert later.headers["x-orchestrator-attempts"] == "1"
    assert (await stats(client, mock_server_url))["openai"]["requests"] == reached_openai


async def test_scenario_5_validation_fails_fast_without_a_provider_call(client, mock_server_url, gateway_url):
    start = trio.current_time()
    response = await client.post(
        f"{gateway_url}/v1/chat/completions",
        content=b'{\n  "model":"gpt-4",\n  "messages":[]\n}',
        headers=CURL_FORM,
    )
    elapsed = trio.current_time() - start
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "empty" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-orchestrator-attempts"] == "0"
    assert elapsed < 0.5  # loopback round trip included; validation itself is microseconds
    witnessed = await stats(client, mock_server_url)
    assert witnessed["openai"]["requests"] == 0 and witnessed["anthropic"]["requests"] == 0


async def test_bodies_without_a_content_type_are_json_too(client, gateway_url):
    response = await client.post(f"{gateway_url}/v1/chat/completions", content=SEED_BODY)
    assert response.status_code == 200


async def test_the_client_request_id_travels(client, gateway_url):
    response = await client.post(
        f"{gateway_url}/v1/chat/completions", content=SEED_BODY, headers={"x-request-id": "trace-42"}
    )
    assert response.headers["x-request-id"] == "trace-42"
    bad = await client.post(f"{gateway_url}/v1/chat/completions", content=b"{", headers={"x-request-id": "trace-43"})
    assert bad.status_code == 400
    assert bad.headers["x-request-id"] == "trace-43"
    assert bad.json()["error"]["request_id"] == "trace-43"


@pytest.mark.parametrize(
    "path, method, status",
    [("/v1/nothing", "GET", 404), ("/v1/chat/completions", "GET", 405), ("/health", "POST", 405)],
)
async def test_unknown_endpoints_answer_in_openai_shape(client, gateway_url, path, method, status):
    response = await client.request(method, f"{gateway_url}{path}")
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]


async def test_an_oversized_body_is_413(client, gateway_url):
    big = b'{"model":"gpt-4","messages":[{"role":"user","content":"' + b"x" * (5 * 1024 * 1024) + b'"}]}'
    response = await client.post(f"{gateway_url}/v1/chat/completions", content=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_unknown_model_is_404(client, gateway_url):
    response = await client.post(
        f"{gateway_url}/v1/chat/completions", content=b'{"model":"llama","messages":[{"role":"user","content":"x"}]}'
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_request_timeout_header(client, mock_server_url, gateway_url):
    await configure_mock(client, mock_server_url, b'{"timeout_probability":1.0,"timeout_duration_seconds":5}')
    await configure_mock(client, mock_server_url,
                         b'{"provider":"anthropic","timeout_probability":1.0,"timeout_duration_seconds":5}')
    start = trio.current_time()
    response = await client.post(
        f"{gateway_url}/v1/chat/completions", content=SEED_BODY, headers={"x-request-timeout": "0.3"}
    )
    assert response.status_code == 504
    assert trio.current_time() - start < 2
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "deadline_exceeded"
    invalid = await client.post(
        f"{gateway_url}/v1/chat/completions", content=SEED_BODY, headers={"x-request-timeout": "soon"}
    )
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "X-Request-Timeout"


async def test_models(client, gateway_url):
    response = await client.get(f"{gateway_url}/v1/models")
    ids = [model["id"] for model in response.json()["data"]]
    assert "gpt-*" in ids


# -- the official OpenAI SDK as a client of the gateway --------------------------------


def sdk(gateway_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="not-needed", max_retries=0)


async def test_openai_sdk_non_streaming(gateway_url):
    completion = await sdk(gateway_url).chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "hello"}]
    )
    assert completion.choices[0].message.content
    assert completion.usage.total_tokens > 0


async def test_openai_sdk_streaming(gateway_url):
    stream = await sdk(gateway_url).chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text and finish == "stop"
    assert usage is not None and usage.completion_tokens == len(text.split())


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_through_a_failover(client, mock_server_url, gateway_url, stream):
    await configure_mock(client, mock_server_url, b'{"rate_limit_probability":1.0}')
    gw = sdk(gateway_url)
    if stream:
        response = await gw.chat.completions.with_raw_response.create(
            model="gpt-4", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        text = ""
        async for chunk in response.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        assert text
    else:
        response = await gw.chat.completions.with_raw_response.create(
            model="gpt-4", messages=[{"role": "user", "content": "hello"}]
        )
        assert response.parse().model.startswith("claude-")
    assert response.headers["x-orchestrator-provider"] == "anthropic"


async def test_openai_sdk_sees_gateway_errors_as_typed_exceptions(gateway_url):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(gateway_url).chat.completions.create(model="gpt-4", messages=[])
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        await sdk(gateway_url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
