"""The mock app through the in-process transport, under trio's MockClock.

Every test here takes ``autojump_clock`` (pytest-trio only uses a clock passed as an
argument): a 30 s stall costs nothing and its length is asserted exactly.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import orjson
import pytest
import trio

from mock_server import FaultProfile, MockState, count_tokens, create_app, open_mock_transport, reply_for
from mock_server.testing import PATHS, body_for, observe

PERSONALITIES = ["openai", "anthropic"]
ERROR_SHAPES = {
    "openai": lambda body: set(body["error"]) == {"message", "type", "param", "code"},
    "anthropic": lambda body: body["type"] == "error" and set(body["error"]) == {"type", "message"},
}


async def configure(client: httpx.AsyncClient, **fields) -> dict:
    response = await client.post("/config/failures", json=fields)
    assert response.status_code == 200, response.text
    return response.json()


# --- Normal answers ------------------------------------------------------------------


async def test_openai_completion_shape(autojump_clock, mock_client):
    response = await mock_client.post(PATHS["openai"], json=body_for("openai", model="gpt-4o-mini"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    reply = response.json()
    assert reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-")
    assert isinstance(reply["created"], int)
    assert reply["model"] == "gpt-4o-mini"
    [choice] = reply["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reply_for("test")
    assert choice["finish_reason"] == "stop"
    tokens = count_tokens(reply_for("test"))
    assert reply["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": tokens,
        "total_tokens": tokens + 1,
    }


async def test_anthropic_message_shape(autojump_clock, mock_client):
    body = body_for("anthropic", system="You are terse.")
    response = await mock_client.post(PATHS["anthropic"], json=body)
    assert response.status_code == 200
    reply = response.json()
    assert reply["type"] == "message"
    assert reply["role"] == "assistant"
    assert reply["model"] == "claude-3-5-sonnet"
    assert reply["content"] == [{"type": "text", "text": reply_for("test")}]
    assert reply["stop_reason"] == "end_turn"
    assert reply["usage"] == {"input_tokens": 4, "output_tokens": count_tokens(reply_for("test"))}


async def test_openai_stream_sequence(autojump_clock, mock_client):
    body = body_for("openai", stream=True, stream_options={"include_usage": True})
    seen = await observe(mock_client, "openai", body=body)
    assert seen.headers["content-type"].startswith("text/event-stream")
    data = [event.data for event in seen.events]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(item["object"] == "chat.completion.chunk" for item in data[:-1])
    assert len({item["id"] for item in data[:-1]}) == 1
    tokens = count_tokens(reply_for("test"))
    assert len(seen.content_events) == tokens  # one chunk per token
    assert seen.text == reply_for("test")
    finish, usage, done = data[-3:]
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": tokens,
        "total_tokens": tokens + 1,
    }
    assert done == "[DONE]"
    assert seen.kind() == "ok"


async def test_openai_stream_without_usage_has_no_usage_chunk(autojump_clock, mock_client):
    seen = await observe(mock_client, "openai", stream=True)
    assert [event.data for event in seen.events][-1] == "[DONE]"
    assert not any("usage" in event.data for event in seen.events[:-1])


async def test_anthropic_stream_sequence(autojump_clock, mock_client):
    seen = await observe(mock_client, "anthropic", stream=True)
    names = [event.raw.split(b"\n")[0] for event in seen.events]
    tokens = count_tokens(reply_for("test"))
    assert names == [
        b"event: message_start",
        b"event: content_block_start",
        b"event: ping",
        *[b"event: content_block_delta"] * tokens,
        b"event: content_block_stop",
        b"event: message_delta",
        b"event: message_stop",
    ]
    data = [event.data for event in seen.events]
    assert data[0]["message"]["model"] == "claude-3-5-sonnet"
    assert data[0]["message"]["usage"]["input_tokens"] == 1
    assert data[-2]["delta"]["stop_reason"] == "end_turn"
    assert data[-2]["usage"] == {"output_tokens": tokens}
    assert seen.text == reply_for("test")


@pytest.mark.parametrize("personality", PERSONALITIES)
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_truncates(autojump_clock, mock_client, personality, stream):
    field = "max_tokens" if personality == "anthropic" else "max_completion_tokens"
    seen = await observe(
        mock_client, personality, body=body_for(personality, stream=stream, **{field: 4})
    )
    assert seen.text == " ".join(reply_for("test").split()[:4])
    if personality == "openai" and not stream:
        assert seen.json["choices"][0]["finish_reason"] == "length"
        assert seen.json["usage"]["completion_tokens"] == 4
    elif personality == "openai":
        assert seen.events[-2].data["choices"][0]["finish_reason"] == "length"
    elif not stream:
        assert seen.json["stop_reason"] == "max_tokens"
        assert seen.json["usage"]["output_tokens"] == 4
    else:
        assert seen.events[-2].data["delta"]["stop_reason"] == "max_tokens"
        assert seen.events[-2].data["usage"]["output_tokens"] == 4


async def test_openai_max_tokens_is_also_honoured(autojump_clock, mock_client):
    response = await mock_client.post(PATHS["openai"], json=body_for("openai", max_tokens=2))
    assert response.json()["choices"][0]["message"]["content"] == " ".join(
        reply_for("test").split()[:2]
    )


async def test_content_parts_and_the_last_user_message(autojump_clock, mock_client):
    body = body_for("openai")
    body["messages"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "question"}],
        },
    ]
    reply = (await mock_client.post(PATHS["openai"], json=body)).json()
    assert reply["choices"][0]["message"]["content"] == reply_for("second question")
    assert reply["usage"]["prompt_tokens"] == 2 + 2 + 2 + 2


async def test_both_personalities_give_the_same_reply(autojump_clock, mock_client):
    openai = await observe(mock_client, "openai", body=body_for("openai", content="hello world"))
    anthropic = await observe(
        mock_client, "anthropic", body=body_for("anthropic", content="hello world")
    )
    assert openai.text == anthropic.text == reply_for("hello world")


# --- Assistant prefill ----------------------------------------------------------------


def with_prefill(personality: str, prefill: str, *, stream: bool = False) -> dict:
    body = body_for(personality, stream=stream)
    body["messages"].append({"role": "assistant", "content": prefill})
    return body


@pytest.mark.parametrize("personality", PERSONALITIES)
@pytest.mark.parametrize("stream", [False, True])
async def test_prefill_gets_only_the_remainder(autojump_clock, mock_client, personality, stream):
    full = reply_for("test")
    prefill = " ".join(full.split()[:3])
    seen = await observe(
        mock_client, personality, body=with_prefill(personality, prefill, stream=stream)
    )
    assert seen.kind() == "ok"
    assert prefill + seen.text == full
    assert seen.text.startswith(" ")
    remainder_tokens = count_tokens(full) - 3
    if stream:
        assert len(seen.content_events) == remainder_tokens
    elif personality == "openai":
        assert seen.json["usage"]["completion_tokens"] == remainder_tokens
    else:
        assert seen.json["usage"]["output_tokens"] == remainder_tokens


async def test_prefill_mid_word_continues_the_word(autojump_clock, mock_client):
    full = reply_for("test")
    seen = await observe(mock_client, "openai", body=with_prefill("openai", full[:9]))
    assert full[:9] + seen.text == full


async def test_anthropic_refuses_prefill_ending_in_whitespace_as_the_real_api(
    autojump_clock, mock_client
):
    seen = await observe(mock_client, "anthropic", body=with_prefill("anthropic", "A close "))
    assert seen.status == 400
    assert "trailing whitespace" in seen.json["error"]["message"]


@pytest.mark.parametrize("personality", PERSONALITIES)
async def test_prefill_unsupported_is_a_400_in_the_personality_format(
    autojump_clock, mock_client, personality
):
    await configure(mock_client, provider=personality, prefill_supported=False)
    seen = await observe(mock_client, personality, body=with_prefill(personality, "A close"))
    assert seen.status == 400
    assert ERROR_SHAPES[personality](seen.json)
    assert "prefill" in seen.body.decode()
    # Without the trailing assistant message, the same profile answers.
    assert (await observe(mock_client, personality)).kind() == "ok"


# --- Faults forced by header --------------------------------------------------------------

STREAM_KINDS = ["stream_cut", "stream_stall", "malformed_chunk", "no_done"]
REQUEST_KINDS = ["timeout", "rate_limit", "server_error", "reset", "slow_first_token"]


@pytest.mark.parametrize("personality", PERSONALITIES)
@pytest.mark.parametrize("kind", REQUEST_KINDS + STREAM_KINDS)
async def test_header_forces_the_fault_on_streams(
    autojump_clock, mock_client, mock_state, personality, kind
):
    seen = await observe(mock_client, personality, stream=True, fault=kind)
    assert seen.kind() == kind
    # For that request alone.
    assert (await observe(mock_client, personality, stream=True)).kind() == "ok"
    assert mock_state[personality].stats.outcomes[kind] == 1


@pytest.mark.parametrize("personality", PERSONALITIES)
@pytest.mark.parametrize("kind", REQUEST_KINDS)
async def test_header_forces_the_fault_without_streaming(
    autojump_clock, mock_client, personality, kind
):
    assert (await observe(mock_client, personality, fault=kind)).kind() == kind


@pytest.mark.parametrize("kind", STREAM_KINDS)
async def test_stream_faults_need_a_stream(autojump_clock, mock_client, kind):
    seen = await observe(mock_client, "openai", fault=kind)
    assert seen.status == 400
    assert seen.json["error"]["param"] == "x-mock-fault"


async def test_unknown_fault_header_is_a_400(autojump_clock, mock_client):
    seen = await observe(mock_client, "anthropic", fault="meteor")
    assert seen.status == 400
    assert seen.json["error"]["type"] == "invalid_request_error"
    assert "meteor" in seen.json["error"]["message"]


# --- Faults drawn from profiles -----------------------------------------------------------


@pytest.mark.parametrize("personality", PERSONALITIES)
@pytest.mark.parametrize("kind", REQUEST_KINDS + STREAM_KINDS)
async def test_profile_probabilities(autojump_clock, mock_client, personality, kind):
    async def run(count: int) -> list[str]:
        return [(await observe(mock_client, personality, stream=True)).kind() for _ in range(count)]

    await configure(mock_client, provider=personality, **{f"{kind}_probability": 1.0})
    assert set(await run(6)) == {kind}

    await configure(mock_client, provider=personality, **{f"{kind}_probability": 0.0})
    assert set(await run(6)) == {"ok"}

    await configure(mock_client, provider=personality, seed=7, **{f"{kind}_probability": 0.5})
    first = await run(40)
    await configure(mock_client, provider=personality, seed=7, **{f"{kind}_probability": 0.5})
    assert await run(40) == first
    assert set(first) == {kind, "ok"}
    assert 12 <= first.count(kind) <= 28


async def test_profiles_are_per_personality(autojump_clock, mock_client):
    await configure(mock_client, rate_limit_probability=1.0)  # no provider: openai
    assert (await observe(mock_client, "openai")).kind() == "rate_limit"
    assert (await observe(mock_client, "anthropic")).kind() == "ok"
    await configure(mock_client, provider="all", server_error_probability=1.0)
    assert (await observe(mock_client, "openai")).kind() == "server_error"
    assert (await observe(mock_client, "anthropic")).kind() == "server_error"


async def test_server_errors_vary_under_the_seed(autojump_clock, mock_client):
    async def statuses(personality: str) -> list[int]:
        await configure(mock_client, provider=personality, seed=3, server_error_probability=1.0)
        return [(await observe(mock_client, personality)).status for _ in range(30)]

    openai = await statuses("openai")
    assert set(openai) == {500, 503}
    assert await statuses("openai") == openai
    assert set(await statuses("anthropic")) == {500, 529}


# --- Error formats ------------------------------------------------------------------------


@pytest.mark.parametrize("personality", PERSONALITIES)
@pytest.mark.parametrize("fault", ["timeout", "rate_limit", "server_error"])
async def test_errors_in_the_personality_format(autojump_clock, mock_client, personality, fault):
    seen = await observe(mock_client, personality, fault=fault)
    assert seen.headers["content-type"] == "application/json"
    assert ERROR_SHAPES[personality](seen.json)


async def test_anthropic_error_types(autojump_clock, mock_client):
    types = {
        fault: (await observe(mock_client, "anthropic", fault=fault)).json["error"]["type"]
        for fault in ["timeout", "rate_limit", "server_error"]
    }
    assert types == {
        "timeout": "timeout_error",
        "rate_limit": "rate_limit_error",
        "server_error": "api_error",
    }


async def test_rate_limit_carries_retry_after(autojump_clock, mock_client):
    await configure(mock_client, rate_limit_probability=1.0, retry_after_seconds=2.5)
    seen = await observe(mock_client, "openai")
    assert seen.status == 429
    assert seen.headers["retry-after"] == "3"
    assert seen.headers["retry-after-ms"] == "2500"
    assert seen.json["error"]["code"] == "rate_limit_exceeded"
    forced = await observe(mock_client, "anthropic", fault="rate_limit")
    assert forced.headers["retry-after"] == "1"


# --- Timing, exact under the MockClock --------------------------------------------------------


async def test_timeout_stalls_its_duration_then_504(autojump_clock, mock_client):
    await configure(mock_client, timeout_probability=1.0, timeout_duration_seconds=4.5)
    seen = await observe(mock_client, "openai", stream=True)
    assert seen.status == 504
    assert seen.head_at == pytest.approx(4.5)
    assert (await observe(mock_client, "anthropic", fault="timeout")).elapsed == pytest.approx(3.0)


async def test_a_client_timeout_fires_during_the_stall(autojump_clock, mock_state):
    async with open_mock_transport(mock_state) as transport:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://mock", timeout=2.0
        ) as client:
            start = trio.current_time()
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    PATHS["openai"], json=body_for("openai"), headers={"x-mock-fault": "timeout"}
                )
            assert trio.current_time() - start == pytest.approx(2.0)
            await trio.sleep(0)
    assert mock_state["openai"].stats.disconnects == 1


async def test_stream_stall_pauses_after_the_first_chunk(autojump_clock, mock_client):
    await configure(
        mock_client, provider="anthropic", stream_stall_probability=1.0, stream_stall_seconds=12
    )
    seen = await observe(mock_client, "anthropic", stream=True)
    content = seen.content_events
    assert [event.at for event in content[:2]] == pytest.approx([0, 12])
    assert seen.elapsed == pytest.approx(12)
    assert seen.kind(stall=12) == "stream_stall"


async def test_slow_first_token_sends_the_role_chunk_promptly(autojump_clock, mock_client):
    await configure(mock_client, slow_first_token_probability=1.0, first_token_delay_seconds=7)
    seen = await observe(mock_client, "openai", stream=True)
    assert seen.head_at == 0
    assert seen.events[0].at == 0  # the role chunk
    assert seen.events[0].data["choices"][0]["delta"]["role"] == "assistant"
    assert seen.content_events[0].at == pytest.approx(7)
    assert seen.kind(slow=7) == "slow_first_token"


async def test_slow_first_token_delays_a_whole_non_streaming_reply(autojump_clock, mock_client):
    await configure(mock_client, slow_first_token_probability=1.0, first_token_delay_seconds=7)
    seen = await observe(mock_client, "openai")
    assert seen.elapsed == pytest.approx(7)
    assert seen.kind(slow=7) == "slow_first_token"


@pytest.mark.parametrize("personality", PERSONALITIES)
async def test_latency_sources_add_up(autojump_clock, mock_state, mock_client, personality):
    mock_state.latency_ms = 100  # the CLI's --latency-ms
    await configure(mock_client, provider=personality, latency_ms=250)
    path = "/d50" + PATHS[personality]
    seen = await observe(mock_client, personality, stream=True, path=path)
    assert seen.kind() == "ok"
    assert seen.head_at == pytest.approx(0.4)
    await configure(mock_client, provider=personality)  # {} keeps the server's own latency
    assert (await observe(mock_client, personality)).elapsed == pytest.approx(0.1)


async def test_chunk_delay_paces_the_stream(autojump_clock, mock_client):
    await configure(mock_client, chunk_delay_ms=20)
    seen = await observe(mock_client, "openai", stream=True)
    times = [event.at for event in seen.content_events]
    assert times == pytest.approx([0.02 * index for index in range(len(times))])


class _Writes:
    """The body writes of one model request, sent straight to the mock's ASGI app."""

    def __init__(self) -> None:
        self.bodies: list[tuple[float, bytes]] = []
        #: Whether each body message said more would follow.
        self.more: list[bool] = []
        self._request = [{"type": "http.request", "body": orjson.dumps(body_for("openai", stream=True))}]

    async def receive(self) -> dict:
        if self._request:
            return self._request.pop()
        await trio.sleep_forever()

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.body":
            self.bodies.append((trio.current_time(), message["body"]))
            self.more.append(message.get("more_body", False))

    async def run(self, state: MockState) -> list[tuple[float, bytes]]:
        scope = {"type": "http", "method": "POST", "path": PATHS["openai"], "headers": [], "extensions": {}}
        await create_app(state)(scope, self.receive, self.send)
        return self.bodies


@pytest.mark.parametrize(("profile", "writes"), [
    pytest.param({}, [0.0], id="unpaced: the whole stream in one write"),
    pytest.param({"slow_first_token_probability": 1.0, "first_token_delay_seconds": 7}, [0.0, 7.0],
                 id="slow first token: the head, then the rest"),
    pytest.param({"stream_stall_probability": 1.0, "stream_stall_seconds": 12, "stream_fault_after_chunks": 2},
                 [0.0, 12.0], id="stall: what came before it, then the rest"),
])
async def test_events_due_together_leave_in_one_write(autojump_clock, profile, writes):
    state = MockState.create()
    state.configure(FaultProfile.from_fields(profile))
    recorder = _Writes()
    bodies = await recorder.run(state)
    assert [at for at, _ in bodies] == pytest.approx(writes)
    assert bodies[-1][1].endswith(b"data: [DONE]\n\n")
    # The last piece is the body's end (no empty send after it): the server writes it
    # with the chunked terminator, and an unpaced stream leaves in one socket write.
    assert recorder.more == [True] * (len(writes) - 1) + [False]


async def test_a_paced_stream_writes_each_chunk_when_due(autojump_clock):
    state = MockState.create()
    state.configure(FaultProfile(chunk_delay_ms=20))
    bodies = await _Writes().run(state)
    pieces = len(reply_for("test").split())
    assert [at for at, _ in bodies] == pytest.approx([0.02 * index for index in range(pieces)])
    assert bodies[0][1].count(b"data: ") == 2  # the role chunk and the first token
    assert bodies[-1][1].count(b"data: ") == 3  # the last token, the finish chunk, [DONE]


async def test_stream_cut_after_chunks(autojump_clock, mock_client):
    await configure(
        mock_client, provider="all", stream_cut_probability=1.0, stream_cut_after_chunks=5
    )
    for personality in PERSONALITIES:
        seen = await observe(mock_client, personality, stream=True)
        assert seen.status == 200
        assert len(seen.content_events) == 5
        assert seen.kind() == "stream_cut"


# --- Disconnects ----------------------------------------------------------------------------


@pytest.mark.parametrize("personality", PERSONALITIES)
async def test_leaving_mid_stream_counts_a_disconnect(
    autojump_clock, mock_client, mock_state, personality
):
    await configure(mock_client, provider=personality, chunk_delay_ms=1000)
    start = trio.current_time()
    async with mock_client.stream(
        "POST", PATHS[personality], json=body_for(personality, stream=True)
    ) as response:
        async for _ in response.aiter_raw():
            if trio.current_time() - start >= 2:
                break
    await trio.sleep(0.001)
    stats = mock_state[personality].stats
    assert stats.disconnects == 1
    assert stats.outcomes["ok"] == 1
    # The handler was cancelled, not left to finish its 20-odd paced chunks.
    assert trio.current_time() - start < 3


async def test_leaving_during_latency_counts_a_disconnect(autojump_clock, mock_client, mock_state):
    await configure(mock_client, latency_ms=5000)
    with trio.move_on_after(1):
        await mock_client.post(PATHS["openai"], json=body_for("openai"))
    await trio.sleep(0.001)
    assert mock_state["openai"].stats.disconnects == 1


async def test_completed_responses_are_not_disconnects(autojump_clock, mock_client, mock_state):
    for kind in [None, "stream_cut", "no_done", "rate_limit", "reset"]:
        await observe(mock_client, "openai", stream=True, fault=kind)
    await trio.sleep(0.001)
    assert mock_state["openai"].stats.disconnects == 0


# --- Configuration endpoints ------------------------------------------------------------------

SEED_BODIES = [
    b"{}",
    b'{\n  "timeout_probability":0.7,\n  "timeout_duration_seconds":3\n}',
    b'{\n  "rate_limit_probability":1.0\n}',
    b'{\n  "server_error_probability":1.0\n}',
    b'{"timeout_probability":0.7,"timeout_duration_seconds":3}',
    b'{"rate_limit_probability":1.0}',
    b'{"server_error_probability":1.0}',
]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("body", SEED_BODIES)
async def test_seed_configuration_bodies(autojump_clock, mock_client, body, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    response = await mock_client.post("/config/failures", content=body, headers=headers)
    assert response.status_code == 200
    expected = json.loads(body)
    assert {name: response.json()["openai"][name] for name in expected} == expected
    current = (await mock_client.get("/config/failures")).json()
    assert current["openai"] == response.json()["openai"]
    assert current["anthropic"]["server_error_probability"] == 0


async def test_each_post_replaces_the_whole_profile(autojump_clock, mock_client):
    await configure(mock_client, timeout_probability=0.7, timeout_duration_seconds=9)
    profiles = await configure(mock_client, rate_limit_probability=1.0)
    assert profiles["openai"]["timeout_probability"] == 0
    assert profiles["openai"]["timeout_duration_seconds"] == 3
    profiles = await configure(mock_client)
    assert all(
        value in (0, 0.0)
        for name, value in profiles["openai"].items()
        if name.endswith("probability")
    )


async def test_get_shows_every_profile_with_every_field(autojump_clock, mock_client):
    profiles = (await mock_client.get("/config/failures")).json()
    assert set(profiles) == {"openai", "anthropic"}
    assert "stream_cut_after_chunks" in profiles["anthropic"]
    assert profiles["openai"]["seed"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"timeout_probability": 1.5}', "timeout_probability"),
        (b'{"rate_limit_probability": -0.1}', "rate_limit_probability"),
        (b'{"timeout_duration_seconds": -3}', "timeout_duration_seconds"),
        (b'{"latency_ms": true}', "latency_ms"),
        (b'{"stream_cut_after_chunks": "2"}', "stream_cut_after_chunks"),
        (b'{"seed": 1.5}', "seed"),
        (b'{"provider": "azure"}', "provider"),
        (b'{"explode_probability": 1}', "explode_probability"),
    ],
)
async def test_bad_profiles_are_400s_naming_the_field(autojump_clock, mock_client, body, field):
    response = await mock_client.post("/config/failures", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field
    assert field in error["message"]


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2]", b'"x"', b"null", b"\xff\xfe"])
async def test_unusable_config_bodies_are_400s(autojump_clock, mock_client, body):
    before = (await mock_client.get("/config/failures")).json()
    response = await mock_client.post("/config/failures", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert (await mock_client.get("/config/failures")).json() == before


async def test_health(autojump_clock, mock_client):
    response = await mock_client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "healthy"})


# --- Validation: nothing a client sends is a 500 -----------------------------------------------

OPENAI_BAD = [
    (b"not json", None),
    (b"[]", None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "gpt-4"}', "messages"),
    (b'{"model": "gpt-4", "messages": []}', "messages"),
    (b'{"model": "gpt-4", "messages": ["hi"]}', "messages[0]"),
    (b'{"model": "gpt-4", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (
        b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        "stream",
    ),
    (
        b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        "max_tokens",
    ),
    (
        b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}',
        "max_tokens",
    ),
    (
        b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}],'
        b' "stream_options": {"include_usage": true}}',
        "stream_options",
    ),
]


@pytest.mark.parametrize(("body", "param"), OPENAI_BAD)
async def test_openai_validation(autojump_clock, mock_client, mock_state, body, param):
    response = await mock_client.post(PATHS["openai"], content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert mock_state["openai"].stats.outcomes["invalid_request"] == 1


ANTHROPIC_BAD = [
    (b"{", "not valid JSON"),
    (
        b'{"model": "claude", "messages": [{"role": "user", "content": "x"}]}',
        "max_tokens: Field required",
    ),
    (
        b'{"model": "claude", "max_tokens": "10", "messages": [{"role": "user", "content": "x"}]}',
        "max_tokens",
    ),
    (b'{"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}', "model"),
    (
        b'{"model": "claude", "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}',
        "messages.0.role",
    ),
    (
        b'{"model": "claude", "max_tokens": 10, "messages": [{"role": "user"}]}',
        "messages.0.content",
    ),
    (
        b'{"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": [1]}]}',
        "messages.0.content",
    ),
]


@pytest.mark.parametrize(("body", "mentions"), ANTHROPIC_BAD)
async def test_anthropic_validation(autojump_clock, mock_client, body, mentions):
    response = await mock_client.post(PATHS["anthropic"], content=body)
    assert response.status_code == 400
    reply = response.json()
    assert reply["type"] == "error"
    assert reply["error"]["type"] == "invalid_request_error"
    assert mentions in reply["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/v1/messages", 405),
        ("POST", "/v1/embeddings", 404),
        ("POST", "/dx/v1/messages", 404),
        ("PUT", "/config/failures", 405),
    ],
)
async def test_wrong_routes_are_json_errors(autojump_clock, mock_client, method, path, status):
    response = await mock_client.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert ERROR_SHAPES["anthropic" if path.endswith("/v1/messages") else "openai"](body)


async def test_unicode_and_odd_json_do_not_break_it(autojump_clock, mock_client):
    for content in ["ünïcödé ✓", "", "   ", "a\u0000b", "\U0001f600" * 100]:
        seen = await observe(mock_client, "openai", body=body_for("openai", content=content))
        assert seen.kind() == "ok"
        assert seen.text == reply_for(content)
    response = await mock_client.post(PATHS["openai"], content=b"[" * 5000 + b"]" * 5000)
    assert response.status_code == 400


# --- Statistics ---------------------------------------------------------------------------------


async def test_stats_reconcile_with_what_was_sent(autojump_clock, mock_client, mock_state):
    await configure(mock_client, seed=11, rate_limit_probability=0.3, server_error_probability=0.3)
    await configure(mock_client, provider="anthropic", seed=11, stream_cut_probability=0.5)
    sent: dict[str, list[str]] = {"openai": [], "anthropic": []}
    for index in range(30):
        sent["openai"].append((await observe(mock_client, "openai", stream=index % 2 == 0)).kind())
        sent["anthropic"].append((await observe(mock_client, "anthropic", stream=True)).kind())
    for fault in ["reset", "timeout"]:
        sent["openai"].append((await observe(mock_client, "openai", fault=fault)).kind())
    for _ in range(3):
        await mock_client.post(PATHS["anthropic"], content=b"{}")
        sent["anthropic"].append("invalid_request")

    stats = (await mock_client.get("/stats")).json()
    for personality, kinds in sent.items():
        counted = {kind: count for kind, count in stats[personality]["outcomes"].items() if count}
        assert counted == Counter(kinds)
        assert stats[personality]["requests"] == len(kinds)
        assert stats[personality]["disconnects"] == 0
    # The profiles did bite: this is not a run of successes.
    assert {"rate_limit", "server_error", "ok"} <= set(sent["openai"])
    assert {"stream_cut", "ok"} <= set(sent["anthropic"])

    reset = (await mock_client.post("/stats/reset")).json()
    assert reset["openai"]["requests"] == 0
    assert set(reset["openai"]["outcomes"].values()) == {0}
    assert mock_state["anthropic"].stats.requests == 0


async def test_stats_lists_every_outcome(autojump_clock, mock_client):
    stats = (await mock_client.get("/stats")).json()
    assert set(stats["openai"]["outcomes"]) == {
        "ok", "invalid_request", "timeout", "rate_limit", "server_error", "reset",
        "slow_first_token", "stream_cut", "stream_stall", "malformed_chunk", "no_done",
    }  # fmt: skip


async def test_a_state_outlives_its_app(autojump_clock):
    state = MockState.create(seed=5)
    for _ in range(2):
        async with open_mock_transport(state) as transport:
            async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
                assert (await observe(client, "openai")).kind() == "ok"
    assert state["openai"].stats.requests == 2
