"""Keys and secrets: client keys, the separate admin key, and canaries that never leak."""

from __future__ import annotations

import io
import logging

import attrs
import httpx
import pytest

from gateway_fixtures import SEED_BODY, demo_config, start_gateway
from orchestrator.config import Config
from orchestrator.logs import JsonFormatter, TextFormatter

CLIENT_KEY = "sk-client-canary-7f3a9c"
ADMIN_KEY = "sk-admin-canary-51be02"
OPENAI_KEY = "sk-openai-canary-d41d8c"
ANTHROPIC_KEY = "sk-ant-canary-98f00b"
CANARIES = (CLIENT_KEY, ADMIN_KEY, OPENAI_KEY, ANTHROPIC_KEY)


def keyed_config(mock_url: str, **changes) -> Config:
    config = Config.from_mapping({
        "retry": {"backoff_base_seconds": 0.01},
        "client_keys": [CLIENT_KEY],
        "admin_keys": [ADMIN_KEY],
        "providers": {
            "openai": {"kind": "openai", "base_url": f"{mock_url}/v1", "api_key": OPENAI_KEY},
            "anthropic": {"kind": "anthropic", "base_url": mock_url, "api_key": ANTHROPIC_KEY},
        },
        "routes": [{"match": "gpt-*", "deployments": [
            {"provider": "openai"}, {"provider": "anthropic", "model": "claude-sonnet-4-5"}]}],
    })
    return attrs.evolve(config, **changes)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def gateway(mock_server_url, nursery):
    return await start_gateway(nursery, keyed_config(mock_server_url))


async def test_client_keys_guard_the_api_but_not_health(gateway):
    async with httpx.AsyncClient() as client:
        missing = await client.post(f"{gateway}/v1/chat/completions", content=SEED_BODY)
        wrong = await client.post(f"{gateway}/v1/chat/completions", content=SEED_BODY, headers=bearer("sk-nope-123"))
        admin_as_client = await client.post(f"{gateway}/v1/chat/completions", content=SEED_BODY,
                                            headers=bearer(ADMIN_KEY))
        models = await client.get(f"{gateway}/v1/models")
        right = await client.post(f"{gateway}/v1/chat/completions", content=SEED_BODY, headers=bearer(CLIENT_KEY))
        health = await client.get(f"{gateway}/health")
    for response in (missing, wrong, admin_as_client, models):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["x-request-id"]
    assert right.status_code == 200
    assert health.status_code == 200


async def test_the_admin_key_alone_resets_a_breaker(gateway, mock_server_url):
    async with httpx.AsyncClient() as client:
        await client.post(f"{mock_server_url}/config/failures", content=b'{"server_error_probability":1.0}')
        for _ in range(5):
            await client.post(f"{gateway}/v1/chat/completions", content=SEED_BODY, headers=bearer(CLIENT_KEY))
        assert (await client.get(f"{gateway}/health")).json()["providers"]["openai"]["circuit"] == "open"
        url = f"{gateway}/admin/providers/openai/reset"
        assert (await client.post(url)).status_code == 401
        assert (await client.post(url, headers=bearer(CLIENT_KEY))).status_code == 401
        reset = await client.post(url, headers=bearer(ADMIN_KEY))
        assert reset.status_code == 200
        assert reset.json()["circuit"] == "closed" and reset.json()["consecutive_failures"] == 0
        assert (await client.get(f"{gateway}/health")).json()["providers"]["openai"]["circuit"] == "closed"
        unknown = await client.post(f"{gateway}/admin/providers/nobody/reset", headers=bearer(ADMIN_KEY))
        assert unknown.status_code == 404


async def test_without_admin_keys_there_is_no_admin_api(mock_server_url, nursery):
    gateway = await start_gateway(nursery, demo_config(mock_server_url))
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{gateway}/admin/providers/openai/reset", headers=bearer(ADMIN_KEY))
    assert response.status_code == 404


async def test_canaries_never_appear_in_logs_responses_or_health(mock_server_url, nursery, mock_state):
    text_log, json_log = io.StringIO(), io.StringIO()
    handlers = []
    for stream, formatter in ((text_log, TextFormatter()), (json_log, JsonFormatter())):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.setLevel(logging.DEBUG)
        handlers.append(handler)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    for handler in handlers:
        root.addHandler(handler)
    seen: list[str] = []
    try:
        gateway = await start_gateway(nursery, keyed_config(mock_server_url))
        async with httpx.AsyncClient() as client:

            async def send(method: str, path: str, **kwargs) -> None:
                response = await client.request(method, f"{gateway}{path}", **kwargs)
                seen.append(str(response.status_code) + repr(dict(response.headers)) + response.text)

            key = bearer(CLIENT_KEY)
            await send("POST", "/v1/chat/completions", content=SEED_BODY, headers=key)
            await send("POST", "/v1/chat/completions", content=SEED_BODY)  # no key
            await send("POST", "/v1/chat/completions", content=SEED_BODY, headers=bearer(OPENAI_KEY))  # wrong key
            await send("POST", "/v1/chat/completions", content=b'{"model":"gpt-4","messages":[]}', headers=key)
            await send("POST", "/v1/chat/completions", content=b"{not json", headers=key)
            await send("POST", "/v1/chat/completions", headers=key,
                       content=b'{"model":"gpt-4","messages":[{"role":"user","content":"x"}],"api_key":"sk-x"}')
            for profile in (b'{"provider":"all","server_error_probability":1.0}',
                            b'{"provider":"all","rate_limit_probability":1.0}',
                            b'{"provider":"all","stream_cut_probability":1.0,"stream_cut_after_chunks":2}'):
                await client.post(f"{mock_server_url}/config/failures", content=profile)
                await send("POST", "/v1/chat/completions", content=SEED_BODY, headers=key)
                await send("POST", "/v1/chat/completions", headers=key,
                           content=b'{"model":"gpt-4","stream":true,"messages":[{"role":"user","content":"x"}]}')
            await send("GET", "/health")
            await send("GET", "/v1/models", headers=key)
            await send("POST", "/admin/providers/openai/reset", headers=bearer(ADMIN_KEY))
            await send("POST", "/admin/providers/openai/reset", headers=bearer(CLIENT_KEY))
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(old_level)
    logs = text_log.getvalue() + json_log.getvalue()
    assert "rejected key key_" in logs  # the key id is logged, not the key
    assert len(seen) == 16 and "request accepted" in logs
    everything = logs + "".join(seen)
    for canary in CANARIES:
        assert canary not in everything, canary
    # The provider keys did reach their own providers, and only those.
    assert mock_state["openai"].stats.requests > 0


async def test_each_key_goes_only_to_its_own_provider(nursery):
    received: dict[str, list[dict[str, str]]] = {"a.example": [], "b.example": []}

    def handler(request: httpx.Request) -> httpx.Response:
        received[request.url.host].append(dict(request.headers))
        return httpx.Response(429, json={"error": {"message": "busy", "type": "rate_limit_error"}})

    config = Config.from_mapping({
        "providers": {
            "a": {"kind": "openai", "base_url": "http://a.example/v1", "api_key": OPENAI_KEY},
            "b": {"kind": "anthropic", "base_url": "http://b.example", "api_key": ANTHROPIC_KEY},
        },
        "routes": [{"match": "*", "deployments": [{"provider": "a"}, {"provider": "b", "model": "claude"}]}],
    })
    from orchestrator.service import open_orchestrator

    async with open_orchestrator(config, transport=httpx.MockTransport(handler)) as gw:
        with pytest.raises(Exception):
            await gw.chat_completion({"model": "m", "messages": [{"role": "user", "content": "x"}]}, timeout=0.1)
    [to_a] = received["a.example"]
    [to_b] = received["b.example"]
    assert to_a["authorization"] == f"Bearer {OPENAI_KEY}" and ANTHROPIC_KEY not in repr(to_a)
    assert to_b["x-api-key"] == ANTHROPIC_KEY and OPENAI_KEY not in repr(to_b)
