"""The mock over a real socket (127.0.0.1, port 0), with the official SDKs as clients.

No MockClock here: these tests do real I/O and wait only on things that happen at once.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
import trio

from mock_server import FaultProfile, MockState, count_tokens, reply_for
from mock_server.testing import PATHS, body_for, observe

MESSAGES = [{"role": "user", "content": "test"}]


@pytest.fixture
def openai_client(mock_server_url: str) -> openai.AsyncOpenAI:
    # max_retries=0: the SDK would otherwise retry the mock's faults by itself.
    return openai.AsyncOpenAI(base_url=f"{mock_server_url}/v1", api_key="mock", max_retries=0)


@pytest.fixture
def anthropic_client(mock_server_url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=mock_server_url, api_key="mock", max_retries=0)


async def test_openai_sdk_completion(openai_client):
    completion = await openai_client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert completion.model == "gpt-4"
    assert completion.choices[0].message.content == reply_for("test")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == count_tokens(reply_for("test"))


async def test_openai_sdk_stream(openai_client):
    stream = await openai_client.chat.completions.create(
        model="gpt-4", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == reply_for("test")
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == count_tokens(text)


async def test_anthropic_sdk_message(anthropic_client):
    message = await anthropic_client.messages.create(
        model="claude-3-5-haiku", max_tokens=64, messages=MESSAGES
    )
    assert message.model == "claude-3-5-haiku"
    assert message.content[0].text == reply_for("test")
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == count_tokens(reply_for("test"))


async def test_anthropic_sdk_stream(anthropic_client):
    async with anthropic_client.messages.stream(
        model="claude-3-5-haiku", max_tokens=5, messages=MESSAGES
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) == 5
    assert "".join(pieces) == final.content[0].text == " ".join(reply_for("test").split()[:5])
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 5


async def test_sdks_see_the_errors_they_expect(openai_client, anthropic_client):
    with pytest.raises(openai.RateLimitError) as rate_limited:
        await openai_client.chat.completions.create(
            model="gpt-4", messages=MESSAGES, extra_headers={"x-mock-fault": "rate_limit"}
        )
    assert rate_limited.value.response.headers["retry-after"] == "1"
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        await anthropic_client.messages.create(
            model="claude-3-5-haiku",
            messages=MESSAGES,
            max_tokens=1,
            extra_body={"max_tokens": None},
        )
    with pytest.raises(anthropic.InternalServerError):
        await anthropic_client.messages.create(
            model="claude-3-5-haiku",
            max_tokens=8,
            messages=MESSAGES,
            extra_headers={"x-mock-fault": "server_error"},
        )
    with pytest.raises(openai.APIConnectionError):
        await openai_client.chat.completions.create(
            model="gpt-4", messages=MESSAGES, extra_headers={"x-mock-fault": "reset"}
        )


async def test_reset_is_a_real_connection_reset(mock_server_url, mock_state):
    async with httpx.AsyncClient(base_url=mock_server_url) as client:
        with pytest.raises(httpx.ReadError):
            await client.post(
                PATHS["openai"], json=body_for("openai"), headers={"x-mock-fault": "reset"}
            )
        # Raw socket: not one response byte before the connection dies.
        host, port = mock_server_url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        body = b'{"model":"m","messages":[{"role":"user","content":"x"}]}'
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nx-mock-fault: reset\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        with pytest.raises(trio.BrokenResourceError):  # ECONNRESET; a FIN would read b""
            await stream.receive_some(1000)
        await stream.aclose()
        # The server goes on serving.
        assert (await observe(client, "openai")).kind() == "ok"
    assert mock_state["openai"].stats.outcomes["reset"] == 2


# The demo guide's commands, exactly as typed there: curl -d sends these bytes with
# Content-Type application/x-www-form-urlencoded.
SEED_COMMANDS = [
    (b"{}", "ok"),
    (b'{\n  "timeout_probability":0.7,\n  "timeout_duration_seconds":3\n}', None),
    (b'{\n  "rate_limit_probability":1.0\n}', "rate_limit"),
    (b'{\n  "server_error_probability":1.0\n}', "server_error"),
    (b"{}", "ok"),
    (b'{"rate_limit_probability":1.0}', "rate_limit"),
    (b'{"server_error_probability":1.0}', "server_error"),
    (b'{"timeout_probability":0.7,"timeout_duration_seconds":3}', None),
]
SEED_CHAT = b'{"model":"gpt-4","messages":[{"role":"user","content":"test"}]}'
CURL_HEADERS = {
    "content-type": "application/x-www-form-urlencoded",
    "user-agent": "curl/8.5.0",
    "accept": "*/*",
}


@pytest.mark.parametrize("headers", [CURL_HEADERS, {}], ids=["curl-form", "no-content-type"])
async def test_the_seed_demo_commands_byte_for_byte(mock_server_url, headers):
    async with httpx.AsyncClient(base_url=mock_server_url) as client:
        for body, then in SEED_COMMANDS:
            response = await client.post("/config/failures", content=body, headers=headers)
            assert response.status_code == 200, response.text
            if then is None:
                assert response.json()["openai"]["timeout_probability"] == 0.7
                assert response.json()["openai"]["timeout_duration_seconds"] == 3
                continue
            answers = [
                await client.post(PATHS["openai"], content=SEED_CHAT, headers=headers)
                for _ in range(3)
            ]
            expected = {"ok": 200, "rate_limit": 429, "server_error": None}[then]
            if expected is None:
                assert all(answer.status_code in (500, 503) for answer in answers)
            else:
                assert [answer.status_code for answer in answers] == [expected] * 3
            # The seed's demo: OpenAI breaks, Anthropic keeps answering.
            anthropic_answer = await client.post(
                PATHS["anthropic"],
                content=b'{"model":"claude","max_tokens":50,"messages":[{"role":"user","content":"test"}]}',
                headers=headers,
            )
            assert anthropic_answer.status_code == 200


async def test_a_client_leaving_is_counted_as_a_disconnect(mock_server_url, mock_state: MockState):
    mock_state["anthropic"].profile = FaultProfile(chunk_delay_ms=500)
    async with httpx.AsyncClient(base_url=mock_server_url) as client:
        async with client.stream(
            "POST", PATHS["anthropic"], json=body_for("anthropic", stream=True)
        ) as response:
            async for chunk in response.aiter_raw():
                if b"content_block_delta" in chunk:
                    break
        # The disconnect reaches the handler within milliseconds; wait for it, bounded.
        with trio.fail_after(5):
            while mock_state["anthropic"].stats.disconnects == 0:
                await trio.sleep(0.01)
    assert mock_state["anthropic"].stats.disconnects == 1
    assert mock_state["anthropic"].stats.outcomes["ok"] == 1
