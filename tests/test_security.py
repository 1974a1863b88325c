"""Keys and secrets: client keys, the separate admin key, and canaries that never leak."""

from __future__ import annotations

import io
import logging

import attrs
import httpx
import orjson
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


# --- A provider that echoes its key back ---------------------------------------------
#
# Upstreams quote the key they were sent when they reject it; the gateway masks its
# provider's key in everything it takes from an answer (providers/redact.py).

ECHOED_KEY = "sk-SECRET-CX-KEY-999"
STREAM_BODY = b'{"model":"gpt-4","stream":true,"messages":[{"role":"user","content":"x"}]}'


def echoing_config(kind: str) -> Config:
    """One provider of ``kind`` at upstream.example, holding ECHOED_KEY: the OpenAI one
    configured with ``api_key``, the Anthropic one through ``api_key_env``."""
    if kind == "openai":
        provider = {"kind": "openai", "base_url": "http://upstream.example/v1", "api_key": ECHOED_KEY}
    else:
        provider = {"kind": "anthropic", "base_url": "http://upstream.example", "api_key_env": "ECHOED_KEY"}
    return Config.from_mapping({
        "retry": {"max_attempts": 1},
        "providers": {"upstream": provider},
        "routes": [{"match": "*", "deployments": [{"provider": "upstream", "model": "m"}]}],
    }, environ={"ECHOED_KEY": ECHOED_KEY})


def error_body(kind: str, error_type: str, message: str) -> dict:
    """An error in ``kind``'s wire format; OpenAI's quotes the header in ``param`` too."""
    if kind == "openai":
        return {"error": {"message": message, "type": error_type, "code": error_type,
                          "param": f"Authorization: Bearer {ECHOED_KEY}"}}
    return {"type": "error", "error": {"type": error_type, "message": message}}


def stream_events(kind: str, *, content_first: bool) -> bytes:
    """An event stream that reports an error quoting the key, after one piece of content
    (the stream is committed: the client sees an interruption) or before any."""
    error = error_body(kind, "overloaded_error", f"Overloaded while serving key {ECHOED_KEY}")
    if kind == "openai":
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}
        events = [chunk] if content_first else []
    else:
        start = {"type": "message_start", "message": {"id": "msg", "model": "m", "usage": {"input_tokens": 1}}}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "Hel"}}
        events = [start, block] if content_first else [start]
    return b"".join(b"data: " + orjson.dumps(item) + b"\n\n" for item in [*events, error])


async def echoed(nursery, caplog, kind: str, body: bytes, status: int, **answer) -> tuple[httpx.Response, str]:
    """Send ``body`` through a gateway whose provider answers ``status`` and ``answer``
    (``httpx.Response``'s arguments); the gateway's
    response, and every log record it wrote, formatted as the gateway's text and JSON
    logs are (JSON adds the records' fields, which ``caplog.text`` leaves out)."""
    caplog.set_level(logging.DEBUG)
    upstream = httpx.MockTransport(lambda _: httpx.Response(status, **answer))
    gateway = await start_gateway(nursery, echoing_config(kind), transport=upstream)
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{gateway}/v1/chat/completions", content=body)
    logs = "".join(TextFormatter().format(record) + JsonFormatter().format(record) for record in caplog.records)
    return response, logs


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(("status", "error_type", "message", "answered"), [
    (401, "authentication_error", f"Incorrect API key provided: {ECHOED_KEY}", 502),
    (400, "invalid_request_error", f"Malformed header 'Authorization: Bearer {ECHOED_KEY}'", 400),
], ids=["401-echoed", "400-quoted"])
async def test_a_key_echoed_in_an_error_reaches_neither_the_client_nor_the_log(
    nursery, caplog, kind, status, error_type, message, answered
):
    response, logs = await echoed(nursery, caplog, kind, SEED_BODY, status, json=error_body(kind, error_type, message))
    assert response.status_code == answered
    assert ECHOED_KEY not in response.text
    assert ECHOED_KEY not in logs
    # The error is still the provider's, with only the key masked.
    assert message.replace(ECHOED_KEY, "[redacted]") in response.json()["error"]["message"]
    if status == 401:
        assert "provider_misconfigured" in logs and "Incorrect API key provided: [redacted]" in logs


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("content_first", [True, False], ids=["interrupted", "before-content"])
async def test_a_key_echoed_in_a_stream_error_reaches_neither_the_client_nor_the_log(
    nursery, caplog, kind, content_first
):
    events = stream_events(kind, content_first=content_first)
    response, logs = await echoed(nursery, caplog, kind, STREAM_BODY, 200, content=events,
                                  headers={"content-type": "text/event-stream"})
    assert response.status_code == (200 if content_first else 502)
    assert ECHOED_KEY not in response.text
    assert ECHOED_KEY not in logs
    assert "Overloaded while serving key [redacted]" in response.text
