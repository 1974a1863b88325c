"""The Anthropic adapter: OpenAI requests to Messages and answers, errors, streams back.

Anthropic-side samples are checked against the official ``anthropic`` SDK's types and
OpenAI-side results against the ``openai`` SDK's, so both ends are the real formats.
"""

from __future__ import annotations

from typing import Any

import anthropic.types
import httpx
import openai.types.chat
import orjson
import pydantic
import pytest
from anthropic.types import tool_result_block_param
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming, MessageCreateParamsStreaming
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.config import ProviderConfig
from orchestrator.messages import ErrorClass
from providers.adapter import (
    MalformedResponse,
    MalformedStream,
    ProviderError,
    ProviderStreamError,
    UnsupportedRequest,
)
from providers.anthropic import (
    ERROR_TYPE_STATUS,
    AnthropicAdapter,
    AnthropicStreamDecoder,
    anthropic_error,
    prefill_whitespace,
)
from providers.classify import classify_response
from providers.sse import ServerSentEvent, SSEDecoder

NOW = 1_700_000_000
CONFIG = ProviderConfig(
    name="anthropic",
    kind="anthropic",
    base_url="https://api.anthropic.com",
    api_key="sk-ant-test",
    default_max_tokens=1024,
)
ADAPTER = AnthropicAdapter(CONFIG)
MODEL = "claude-sonnet-4-5"


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("providers.anthropic.time.time", lambda: NOW + 0.75)


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": list(messages) or [{"role": "user", "content": "Hi"}], **fields}


def translate(body: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
    return orjson.loads(ADAPTER.request(body, stream=stream).content)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any, **fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **fields}


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def function_tool(name: str, **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


# -- request: URL and headers -----------------------------------------------------------


def test_request_goes_to_messages_with_key_and_version() -> None:
    request = ADAPTER.request(chat(), stream=False)
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert request.headers == {
        "content-type": "application/json",
        "accept": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant-test",
    }
    assert ADAPTER.request(chat(), stream=True).headers["accept"] == "text/event-stream"


def test_request_without_key_sends_no_key_header() -> None:
    adapter = AnthropicAdapter(ProviderConfig(name="mock", kind="anthropic", base_url="http://127.0.0.1:8001"))
    request = adapter.request(chat(), stream=False)
    assert request.url == "http://127.0.0.1:8001/v1/messages"
    assert "x-api-key" not in request.headers


# -- request: body ----------------------------------------------------------------------


def test_minimal_request_uses_the_default_max_tokens() -> None:
    assert translate(chat()) == {"model": MODEL, "max_tokens": 1024, "messages": [user("Hi")]}


def test_stream_request_says_stream() -> None:
    assert translate(chat(), stream=True) == {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [user("Hi")],
        "stream": True,
    }


def test_harmless_openai_only_fields_are_dropped() -> None:
    body = chat(
        presence_penalty=0.5,
        frequency_penalty=0.1,
        logit_bias={"50256": -100},
        seed=7,
        stream_options={"include_usage": True},
        response_format={"type": "text"},
        store=False,
        metadata={"team": "search"},
        logprobs=False,
        n=1,
        parallel_tool_calls=True,
        reasoning_effort="low",
    )
    assert translate(body) == {"model": MODEL, "max_tokens": 1024, "messages": [user("Hi")]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 70}, 70),
        ({"max_tokens": 50, "max_completion_tokens": 70}, 70),
        ({"max_tokens": None}, 1024),
    ],
)
def test_max_tokens(fields: dict[str, Any], expected: int) -> None:
    assert translate(chat(**fields))["max_tokens"] == expected


@pytest.mark.parametrize(("openai", "anthropic"), [(0, 0), (0.7, 0.7), (1, 1), (1.5, 1.0), (2, 1.0)])
def test_temperature_is_clamped_to_anthropics_range(openai: float, anthropic: float) -> None:
    assert translate(chat(temperature=openai))["temperature"] == anthropic


def test_top_p_passes_through_without_temperature() -> None:
    assert translate(chat(top_p=0.9))["top_p"] == 0.9
    assert "temperature" not in translate(chat(top_p=0.9))


def test_temperature_wins_over_top_p() -> None:
    request = translate(chat(temperature=0.2, top_p=0.9))
    assert (request["temperature"], "top_p" in request) == (0.2, False)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ["END"]), (["END", "\n\nHuman:"], ["END", "\n\nHuman:"])],
)
def test_stop_becomes_stop_sequences(stop: Any, expected: list[str]) -> None:
    assert translate(chat(stop=stop))["stop_sequences"] == expected


@pytest.mark.parametrize("stop", [None, []])
def test_no_stop_means_no_stop_sequences(stop: Any) -> None:
    assert "stop_sequences" not in translate(chat(stop=stop))


@pytest.mark.parametrize("stop", ["\n", ["END", " \t"], [""]])
def test_whitespace_stop_sequences_are_refused(stop: Any) -> None:
    with pytest.raises(UnsupportedRequest, match="^stop: "):
        translate(chat(stop=stop))


def test_user_becomes_metadata_user_id() -> None:
    assert translate(chat(user="user-42"))["metadata"] == {"user_id": "user-42"}
    assert translate(chat(user="user-42", safety_identifier="hash-9"))["metadata"] == {"user_id": "hash-9"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "functions"),
    ],
)
def test_inexpressible_requests_are_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(UnsupportedRequest, match=f"^{field}: "):
        translate(chat(**fields))


# -- request: messages ------------------------------------------------------------------


def test_system_and_developer_messages_join_into_system() -> None:
    body = chat(
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        user("Hi"),
        {"role": "system", "content": [{"type": "text", "text": "Never apologise."}, {"type": "text", "text": ""}]},
        assistant("Salut."),
        user("Ça va ?"),
    )
    assert translate(body) == {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [user("Hi"), assistant("Salut."), user("Ça va ?")],
        "system": "You are terse.\n\nAnswer in French.\n\nNever apologise.",
    }


def test_user_content_parts_become_blocks_with_images() -> None:
    body = chat(
        user(
            [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]
        )
    )
    assert translate(body)["messages"] == [
        user(
            [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ]
        )
    ]


@pytest.mark.parametrize(
    ("part", "reason"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}, "image/bmp"),
        ({"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}, "input_audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "file"),
    ],
)
def test_content_anthropic_cannot_take_is_refused(part: dict[str, Any], reason: str) -> None:
    with pytest.raises(UnsupportedRequest, match=r"^messages\[1\]\.content\[1\]: .*" + reason):
        translate(chat(user("Hi"), user([{"type": "text", "text": "and"}, part])))


def test_tool_calls_and_results_become_tool_use_and_tool_result() -> None:
    body = chat(
        user("Weather in Paris and Rome?"),
        assistant(
            "Checking.",
            tool_calls=[
                tool_call("call_1", "get_weather", '{"city": "Paris"}'),
                tool_call("call_2", "get_weather", '{"city": "Rome"}'),
            ],
        ),
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24 C"}]},
        user("And tomorrow?"),
        assistant(None, tool_calls=[tool_call("call_3", "get_forecast", "{}")]),
        {"role": "tool", "tool_call_id": "call_3", "content": ""},
    )
    assert translate(body)["messages"] == [
        user("Weather in Paris and Rome?"),
        assistant(
            [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
            ]
        ),
        user(
            [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "24 C"}]},
            ]
        ),
        user("And tomorrow?"),
        assistant([{"type": "tool_use", "id": "call_3", "name": "get_forecast", "input": {}}]),
        user([{"type": "tool_result", "tool_use_id": "call_3"}]),
    ]


@pytest.mark.parametrize("arguments", ['{"city": "Par', "[1, 2]", ""])
def test_tool_call_arguments_that_are_no_json_object_are_refused(arguments: str) -> None:
    body = chat(
        user("Weather?"),
        assistant(None, tool_calls=[tool_call("call_1", "get_weather", arguments)]),
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    )
    with pytest.raises(UnsupportedRequest, match=r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: "):
        translate(body)


def test_tool_call_arguments_nested_deeper_than_can_be_written_are_refused() -> None:
    # The arguments are a JSON string, which validation does not walk: parsed into the
    # tool_use input, 400 levels read but do not write (orjson writes 254), which was
    # an unexpected TypeError, logged with its traceback on every such request.
    arguments = '{"a": ' * 400 + "1" + "}" * 400
    body = chat(
        user("Weather?"),
        assistant(None, tool_calls=[tool_call("call_1", "get_weather", arguments)]),
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    )
    with pytest.raises(UnsupportedRequest, match="deeper than can be forwarded"):
        ADAPTER.request(body, stream=False)


def test_a_tool_call_without_id_is_refused() -> None:
    call = tool_call("call_1", "get_weather", "{}")
    del call["id"]
    with pytest.raises(UnsupportedRequest, match=r"^messages\[1\]\.tool_calls\[0\]\.id: "):
        translate(chat(user("Weather?"), assistant(None, tool_calls=[call]), user("Well?")))


def test_legacy_function_messages_are_refused() -> None:
    body = chat(
        user("Weather?"),
        assistant(None, function_call={"name": "get_weather", "arguments": "{}"}),
        {"role": "function", "name": "get_weather", "content": "18 C"},
    )
    with pytest.raises(UnsupportedRequest, match=r"^messages\[1\]\.function_call: "):
        translate(body)
    with pytest.raises(UnsupportedRequest, match=r"^messages\[1\]\.role: 'function'"):
        translate(chat(user("Weather?"), {"role": "function", "name": "get_weather", "content": "18 C"}, user("So?")))


def test_an_empty_earlier_assistant_turn_is_left_out() -> None:
    body = chat(user("Hi"), assistant(""), user("Hello?"))
    assert translate(body)["messages"] == [user("Hi"), user("Hello?")]


def test_a_conversation_of_system_messages_only_is_refused() -> None:
    with pytest.raises(UnsupportedRequest, match="^messages: "):
        translate(chat({"role": "system", "content": "You are terse."}))


# -- request: prefill -------------------------------------------------------------------


def test_final_assistant_message_is_a_prefill_without_trailing_whitespace() -> None:
    parts = [{"type": "text", "text": "One, "}, {"type": "text", "text": "two, "}]
    body = chat(user("Count to three."), assistant(parts))
    assert translate(body)["messages"] == [user("Count to three."), assistant("One, two,")]
    assert prefill_whitespace(body) == " "


def test_earlier_assistant_messages_keep_their_whitespace() -> None:
    body = chat(user("Hi"), assistant("Hello!\n"), user("Bye"))
    assert translate(body)["messages"][1] == assistant("Hello!\n")
    assert prefill_whitespace(body) == ""


def test_a_whitespace_only_prefill_is_left_out() -> None:
    body = chat(user("Hi"), assistant("\n\n"))
    assert translate(body)["messages"] == [user("Hi")]
    assert prefill_whitespace(body) == "\n\n"


def test_a_prefill_with_tool_calls_is_refused() -> None:
    body = chat(user("Weather?"), assistant(None, tool_calls=[tool_call("call_1", "get_weather", "{}")]))
    with pytest.raises(UnsupportedRequest, match="prefill"):
        translate(body)


# -- request: tools ---------------------------------------------------------------------


def test_function_tools_become_anthropic_tools() -> None:
    body = chat(
        tools=[
            function_tool("get_weather", description="Weather now.", parameters=WEATHER_SCHEMA, strict=True),
            function_tool("get_time"),
        ]
    )
    assert translate(body)["tools"] == [
        {"name": "get_weather", "description": "Weather now.", "input_schema": WEATHER_SCHEMA},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in translate(body)


@pytest.mark.parametrize(
    ("tool_choice", "parallel_tool_calls", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            False,
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        ),
        ("none", False, {"type": "none"}),
        ("required", True, {"type": "any"}),
    ],
)
def test_tool_choice(tool_choice: Any, parallel_tool_calls: bool | None, expected: dict[str, Any]) -> None:
    body = chat(tools=[function_tool("get_weather", parameters=WEATHER_SCHEMA)], tool_choice=tool_choice)
    if parallel_tool_calls is not None:
        body["parallel_tool_calls"] = parallel_tool_calls
    assert translate(body)["tool_choice"] == expected


def test_tool_choice_without_tools_is_dropped() -> None:
    assert translate(chat(tool_choice="none")) == {"model": MODEL, "max_tokens": 1024, "messages": [user("Hi")]}


def test_tools_anthropic_cannot_take_are_refused() -> None:
    with pytest.raises(UnsupportedRequest, match=r"^tools\[1\]\.type: 'custom'"):
        translate(chat(tools=[function_tool("f"), {"type": "custom", "custom": {"name": "g"}}]))
    with pytest.raises(UnsupportedRequest, match="^tool_choice: "):
        translate(chat(tools=[function_tool("f")], tool_choice={"type": "allowed_tools", "allowed_tools": {}}))


# -- request: the anthropic SDK agrees --------------------------------------------------


SAMPLING_PARAMETERS = {"temperature", "top_p"}
REQUESTS = {
    False: pydantic.TypeAdapter(MessageCreateParamsNonStreaming),
    True: pydantic.TypeAdapter(MessageCreateParamsStreaming),
}
MESSAGE = pydantic.TypeAdapter(anthropic.types.MessageParam)
BLOCK = pydantic.TypeAdapter(anthropic.types.ContentBlockParam)
TOOL_RESULT_ITEM = pydantic.TypeAdapter(tool_result_block_param.Content)
TOOL = pydantic.TypeAdapter(anthropic.types.ToolParam)


def check_with_the_anthropic_sdk(request: dict[str, Any]) -> None:
    """Validate ``request`` with the SDK's own types, or raise ``pydantic.ValidationError``.

    Piece by piece: pydantic checks ``Iterable`` fields lazily, and iterating nested
    lazy unions crashes pydantic-core, so lists are checked item by item.
    """
    # The SDK dropped the sampling parameters (newer models reject them); the API still
    # takes them for models that sample, so they are allowed here by name.
    known = MessageCreateParamsNonStreaming.__required_keys__ | MessageCreateParamsNonStreaming.__optional_keys__
    assert set(request) - SAMPLING_PARAMETERS <= known
    REQUESTS[request.get("stream", False)].validate_python({**request, "messages": [], "tools": []})
    for message in request["messages"]:
        MESSAGE.validate_python({**message, "content": ""})
        if isinstance(message["content"], list):
            for block in message["content"]:
                BLOCK.validate_python(block)
                if block["type"] == "tool_result" and isinstance(block.get("content"), list):
                    for item in block["content"]:
                        TOOL_RESULT_ITEM.validate_python(item)
    for tool in request.get("tools", ()):
        TOOL.validate_python(tool)


def test_the_anthropic_sdk_accepts_a_rich_request() -> None:
    body = chat(
        {"role": "system", "content": "You are terse."},
        user(
            [
                {"type": "text", "text": "Weather where this is?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/street.webp"}},
            ]
        ),
        assistant("Let me look.", tool_calls=[tool_call("call_1", "get_weather", '{"city": "Paris"}')]),
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 C"}]},
        assistant("It is 18 C "),
        max_tokens=300,
        temperature=1.3,
        stop=["END"],
        user="user-42",
        tools=[function_tool("get_weather", description="Weather now.", parameters=WEATHER_SCHEMA)],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    request = translate(body)
    check_with_the_anthropic_sdk(request)
    check_with_the_anthropic_sdk(translate(body, stream=True))


@pytest.mark.parametrize(
    "spoil",
    [
        lambda request: request["messages"][0]["content"][1]["source"].update(media_type="image/bmp"),
        lambda request: request["messages"][2]["content"][0]["content"][0].update(type="txt"),
        lambda request: request["tool_choice"].update(type="required"),
        lambda request: request["tools"][0].pop("input_schema"),
        lambda request: request.update(stop="END"),
    ],
)
def test_the_sdk_check_can_fail(spoil: Any) -> None:
    request = translate(
        chat(
            user(
                [
                    {"type": "text", "text": "Hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                ]
            ),
            assistant(None, tool_calls=[tool_call("call_1", "f", "{}")]),
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "ok"}]},
            tools=[function_tool("f")],
            tool_choice="auto",
        )
    )
    check_with_the_anthropic_sdk(request)
    spoil(request)
    with pytest.raises((pydantic.ValidationError, AssertionError)):
        check_with_the_anthropic_sdk(request)


# -- completion -------------------------------------------------------------------------


def message(content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 6, **usage},
    }


TEXT_MESSAGE = message([{"type": "text", "text": "Hello"}, {"type": "text", "text": " there!"}])
TOOL_MESSAGE = message(
    [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "c2ln"},
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Rome", "days": [1, 2]}},
    ],
    stop_reason="tool_use",
)


@pytest.mark.parametrize("sample", [TEXT_MESSAGE, TOOL_MESSAGE], ids=["text", "tool_use"])
def test_message_samples_are_anthropic_messages(sample: dict[str, Any]) -> None:
    anthropic.types.Message.model_validate(sample)


def test_text_completion() -> None:
    completion = ADAPTER.completion(orjson.dumps(TEXT_MESSAGE))
    assert completion == {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "object": "chat.completion",
        "created": NOW,
        "model": "claude-sonnet-4-5-20250929",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }
    openai.types.chat.ChatCompletion.model_validate(completion)


def test_tool_use_completion() -> None:
    completion = ADAPTER.completion(orjson.dumps(TOOL_MESSAGE))
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "toolu_02",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Rome","days":[1,2]}'},
                    },
                ],
            },
            "finish_reason": "tool_calls",
            "logprobs": None,
        }
    ]
    openai.types.chat.ChatCompletion.model_validate(completion)


def test_a_message_without_text_has_no_content() -> None:
    only_tool = message([{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}], stop_reason="tool_use")
    assert ADAPTER.completion(orjson.dumps(only_tool))["choices"][0]["message"]["content"] is None
    empty = message([], stop_reason="max_tokens")
    assert ADAPTER.completion(orjson.dumps(empty))["choices"][0]["message"] == {"role": "assistant", "content": None}


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("a_reason_anthropic_adds_later", "stop"),
    ],
)
def test_finish_reason(stop_reason: str, finish_reason: str) -> None:
    completion = ADAPTER.completion(orjson.dumps(message([{"type": "text", "text": "x"}], stop_reason)))
    assert completion["choices"][0]["finish_reason"] == finish_reason


def test_usage_counts_cached_input_as_prompt_tokens() -> None:
    sample = message(
        [{"type": "text", "text": "x"}], input_tokens=5, cache_creation_input_tokens=100, cache_read_input_tokens=2000
    )
    assert ADAPTER.completion(orjson.dumps(sample))["usage"] == {
        "prompt_tokens": 2105,
        "completion_tokens": 6,
        "total_tokens": 2111,
    }


def test_a_completion_after_a_prefill_does_not_repeat_its_whitespace() -> None:
    body = chat(user("Greet."), assistant("Hello, "))
    payload = orjson.dumps(message([{"type": "text", "text": " world!"}]))
    assert ADAPTER.completion(payload, body)["choices"][0]["message"]["content"] == "world!"
    assert ADAPTER.completion(payload)["choices"][0]["message"]["content"] == " world!"


def _broken(change: dict[str, Any]) -> bytes:
    return orjson.dumps({**TEXT_MESSAGE, **change})


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"<html>Bad gateway</html>", id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"type": "error", "error": {"type": "api_error", "message": "x"}}', id="error-type"),
        pytest.param(_broken({"content": None}), id="no-content"),
        pytest.param(_broken({"content": ["Hello"]}), id="block-not-object"),
        pytest.param(_broken({"content": [{"type": "text"}]}), id="text-without-text"),
        pytest.param(_broken({"content": [{"type": "tool_use", "id": "t", "name": "f"}]}), id="tool-without-input"),
        pytest.param(_broken({"content": [{"type": "tool_use", "id": "t", "input": {}}]}), id="tool-without-name"),
        pytest.param(_broken({"id": None}), id="no-id"),
        pytest.param(_broken({"model": 3}), id="no-model"),
        pytest.param(_broken({"stop_reason": None}), id="no-stop-reason"),
        pytest.param(_broken({"usage": None}), id="no-usage"),
        pytest.param(_broken({"usage": {"input_tokens": "12", "output_tokens": 6}}), id="tokens-not-int"),
        pytest.param(_broken({"usage": {"input_tokens": 12}}), id="no-output-tokens"),
    ],
)
def test_malformed_messages_are_refused(payload: bytes) -> None:
    with pytest.raises(MalformedResponse):
        ADAPTER.completion(payload)


# -- errors -----------------------------------------------------------------------------


def error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


@pytest.mark.parametrize(
    ("status", "error_type", "openai_type"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, "permission_error", "permission_error"),
        (404, "not_found_error", "not_found_error"),
        (413, "request_too_large", "invalid_request_error"),
        (422, "invalid_request_error", "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "api_error", "server_error"),
        (529, "overloaded_error", "server_error"),
    ],
)
def test_error_mapping(status: int, error_type: str, openai_type: str) -> None:
    assert ADAPTER.error(status, error_body(error_type, "Something happened.")) == ProviderError(
        "Something happened.",
        code=error_type,
        error_type=error_type,
        status=status,
        openai_error={"message": "Something happened.", "type": openai_type, "param": None, "code": error_type},
    )


@pytest.mark.parametrize(
    ("status", "payload", "message", "openai_type"),
    [
        (502, b"<html><body>Bad Gateway</body></html>", "HTTP 502 Bad Gateway", "server_error"),
        (529, b"", "HTTP 529", "server_error"),
        (429, b'{"detail": "slow down"}', "HTTP 429 Too Many Requests", "rate_limit_error"),
        (400, b'{"type": "error", "error": {"type": 4}}', "HTTP 400 Bad Request", "invalid_request_error"),
        (500, b'"oops"', "HTTP 500 Internal Server Error", "server_error"),
    ],
)
def test_errors_that_say_nothing_describe_the_status(
    status: int, payload: bytes, message: str, openai_type: str
) -> None:
    assert anthropic_error(status, payload) == ProviderError(
        message, status=status, openai_error={"message": message, "type": openai_type, "param": None, "code": None}
    )


def test_an_error_without_message_is_named_by_its_type() -> None:
    assert ADAPTER.error(529, b'{"type": "error", "error": {"type": "overloaded_error"}}').message == "overloaded_error"


@pytest.mark.parametrize(
    ("status", "error_type", "message", "error_class"),
    [
        (413, "request_too_large", "Request exceeds the maximum size", ErrorClass.TOO_LONG),
        (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum", ErrorClass.TOO_LONG),
        (400, "invalid_request_error", "max_tokens: Field required", ErrorClass.CLIENT_ERROR),
        (401, "authentication_error", "invalid x-api-key", ErrorClass.MISCONFIGURED),
        (404, "not_found_error", "model: claude-nope", ErrorClass.MISCONFIGURED),
        (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit", ErrorClass.RATE_LIMITED),
        (529, "overloaded_error", "Overloaded", ErrorClass.SERVER_ERROR),
    ],
)
def test_errors_classify_as_the_design_says(
    status: int, error_type: str, message: str, error_class: ErrorClass
) -> None:
    error = ADAPTER.error(status, error_body(error_type, message))
    assert classify_response(status, code=error.code, message=error.message) is error_class


# -- stream -----------------------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    """Events as Anthropic sends them: ``event:`` line, ``data:`` line, blank line."""
    return b"".join(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event)) for event in events)


def _json(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def decode(decoder: AnthropicStreamDecoder, stream: bytes) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    for event in SSEDecoder().feed(stream):
        chunks.extend(decoder.feed(event))
    return chunks


def message_start(input_tokens: int = 25, **usage: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_stream",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage},
        },
    }


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def text_delta(index: int, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


def json_delta(index: int, partial: str) -> dict[str, Any]:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return {"type": "content_block_delta", "index": index, "delta": delta}


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str | None, output_tokens: int) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }


PING = {"type": "ping"}
MESSAGE_STOP = {"type": "message_stop"}

TEXT_STREAM = [
    message_start(),
    block_start(0, {"type": "text", "text": ""}),
    PING,
    text_delta(0, "Hello"),
    text_delta(0, " there!"),
    block_stop(0),
    message_delta("end_turn", 15),
    MESSAGE_STOP,
]
TOOL_STREAM = [
    message_start(input_tokens=400),
    block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Two cities."}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}},
    block_stop(0),
    block_start(1, {"type": "text", "text": ""}),
    text_delta(1, "Checking."),
    block_stop(1),
    block_start(2, {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}),
    json_delta(2, ""),
    json_delta(2, '{"city": '),
    json_delta(2, '"Paris"}'),
    block_stop(2),
    block_start(3, {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {}}),
    json_delta(3, '{"city": "Rome"}'),
    block_stop(3),
    message_delta("tool_use", 89),
    MESSAGE_STOP,
]


@pytest.mark.parametrize("event", TEXT_STREAM + TOOL_STREAM)
def test_stream_samples_are_anthropic_events(event: dict[str, Any]) -> None:
    if event["type"] != "ping":  # the SDK has no type for pings
        pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent).validate_python(event)


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "msg_stream",
        "object": "chat.completion.chunk",
        "created": NOW,
        "model": "claude-sonnet-4-5-20250929",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def test_text_stream() -> None:
    decoder = ADAPTER.stream_decoder()
    chunks = decode(decoder, sse(*TEXT_STREAM))
    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": " there!"}),
        chunk({}, "stop"),
    ]
    assert decoder.done
    assert decoder.finish_reason == "stop"
    assert decoder.usage == {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40}
    for item in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(item)


def tool_call_start(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def test_tool_use_stream() -> None:
    decoder = ADAPTER.stream_decoder()
    chunks = decode(decoder, sse(*TOOL_STREAM))
    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking."}),
        chunk({"tool_calls": [tool_call_start(0, "toolu_01", "get_weather")]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [tool_call_start(1, "toolu_02", "get_weather")]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]}),
        chunk({}, "tool_calls"),
    ]
    assert (decoder.done, decoder.finish_reason) == (True, "tool_calls")
    assert decoder.usage == {"prompt_tokens": 400, "completion_tokens": 89, "total_tokens": 489}
    for item in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(item)


def test_initial_text_of_a_block_is_content() -> None:
    decoder = AnthropicStreamDecoder()
    chunks = decode(decoder, sse(message_start(), block_start(0, {"type": "text", "text": "Hi"})))
    assert chunks[1:] == [chunk({"content": "Hi"})]


def test_usage_is_none_before_message_start_then_grows() -> None:
    decoder = AnthropicStreamDecoder()
    assert decoder.usage is None
    assert decoder.feed(ServerSentEvent("ping", '{"type": "ping"}')) == []
    assert decoder.usage is None
    decode(decoder, sse(message_start(input_tokens=7, cache_read_input_tokens=1000)))
    assert decoder.usage == {"prompt_tokens": 1007, "completion_tokens": 1, "total_tokens": 1008}
    assert (decoder.done, decoder.finish_reason) == (False, None)
    decode(decoder, sse(message_delta(None, 3)))
    assert decoder.usage == {"prompt_tokens": 1007, "completion_tokens": 3, "total_tokens": 1010}
    assert decoder.finish_reason is None


def test_cumulative_input_tokens_in_message_delta_replace_the_first_count() -> None:
    decoder = AnthropicStreamDecoder()
    final = message_delta("end_turn", 9)
    final["usage"] = {"input_tokens": 30, "cache_creation_input_tokens": 10, "output_tokens": 9}
    decode(decoder, sse(message_start(input_tokens=30), final))
    assert decoder.usage == {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}


def test_the_event_type_comes_from_the_json() -> None:
    decoder = AnthropicStreamDecoder()
    for event in TEXT_STREAM[:4]:
        decoder.feed(ServerSentEvent("message", _json(event)))  # as if no "event:" line came
    assert decoder.feed(ServerSentEvent("message", _json(text_delta(0, "!")))) == [chunk({"content": "!"})]


def test_unknown_events_and_deltas_are_ignored() -> None:
    decoder = AnthropicStreamDecoder()
    unknown_delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "future_delta", "x": 1}}
    chunks = decode(decoder, sse({"type": "future_event", "x": 1}, message_start(), unknown_delta, PING))
    assert chunks == [chunk({"role": "assistant", "content": ""})]


@pytest.mark.parametrize(
    ("error_type", "message", "openai_type"),
    [
        ("overloaded_error", "Overloaded", "server_error"),
        ("api_error", "Internal server error", "server_error"),
        ("rate_limit_error", "Slow down", "rate_limit_error"),
        ("invalid_request_error", "Output blocked by content filtering policy", "invalid_request_error"),
    ],
)
def test_an_error_event_raises_the_providers_error(error_type: str, message: str, openai_type: str) -> None:
    decoder = ADAPTER.stream_decoder()
    decode(decoder, sse(*TEXT_STREAM[:4]))
    error = {"type": "error", "error": {"type": error_type, "message": message}}
    with pytest.raises(ProviderStreamError) as caught:
        decoder.feed(ServerSentEvent("error", _json(error)))
    assert caught.value.error == ProviderError(
        message,
        code=error_type,
        error_type=error_type,
        status=ERROR_TYPE_STATUS[error_type],
        openai_error={"message": message, "type": openai_type, "param": None, "code": error_type},
    )


def test_an_error_event_may_come_first() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(ProviderStreamError, match="^Overloaded$"):
        decode(AnthropicStreamDecoder(), sse(error))


STARTED = [message_start(), block_start(0, {"type": "text", "text": ""})]


TOOL_WITHOUT_ID = block_start(1, {"type": "tool_use", "name": "f", "input": {}})
START_WITHOUT_ID = {"type": "message_start", "message": {"model": "m", "usage": {}}}


@pytest.mark.parametrize(
    ("before", "data", "reason"),
    [
        pytest.param([], "{not json", "not valid JSON", id="not-json"),
        pytest.param([], "[1, 2]", "not a JSON object", id="not-an-object"),
        pytest.param([], _json({"index": 0}), "no type", id="no-type"),
        pytest.param([], _json(text_delta(0, "Hi")), "before message_start", id="delta-before-start"),
        pytest.param([], _json(MESSAGE_STOP), "before message_start", id="stop-before-start"),
        pytest.param([], _json(START_WITHOUT_ID), "no id", id="start-no-id"),
        pytest.param([], _json({"type": "message_start", "message": "msg_1"}), "not an object", id="start-no-message"),
        pytest.param(STARTED, _json(message_start()), "second message_start", id="second-start"),
        pytest.param(STARTED, _json({**text_delta(0, "x"), "delta": {"type": "text_delta"}}), "no text", id="no-text"),
        pytest.param(STARTED, _json({**text_delta(0, "x"), "index": None}), "no block index", id="no-index"),
        pytest.param(STARTED, _json({"type": "content_block_delta", "index": 0}), "not an object", id="no-delta"),
        pytest.param(STARTED, _json(json_delta(0, "{}")), "which is no tool_use", id="json-for-a-text-block"),
        pytest.param(STARTED, _json(TOOL_WITHOUT_ID), "tool_use block has no id", id="tool-no-id"),
        pytest.param(STARTED, _json({**message_delta("end_turn", 1), "usage": None}), "usage is not", id="no-usage"),
        pytest.param(STARTED, _json({**message_delta("end_turn", 1), "delta": {"stop_reason": 1}}), "stop", id="stop"),
        pytest.param(STARTED, _json({"type": "error", "error": "Overloaded"}), "no error object", id="error-string"),
        pytest.param(TEXT_STREAM, _json(PING), "after message_stop", id="after-message-stop"),
    ],
)
def test_malformed_events_break_the_stream(before: list[dict[str, Any]], data: str, reason: str) -> None:
    decoder = AnthropicStreamDecoder()
    decode(decoder, sse(*before))
    with pytest.raises(MalformedStream, match=reason):
        decoder.feed(ServerSentEvent("message", data))


# -- stream: continuing a prefill -------------------------------------------------------


@pytest.mark.parametrize(
    ("prefill", "deltas", "content"),
    [
        pytest.param("Hello, ", [" world!"], ["world!"], id="space-repeated"),
        pytest.param("Hello, ", ["world!"], ["world!"], id="space-not-repeated"),
        pytest.param("List:\n\n", ["\n", "\n1. milk"], ["1. milk"], id="repeated-across-deltas"),
        pytest.param("List:\n\n", ["\n1. milk"], ["1. milk"], id="partly-repeated"),
        pytest.param("Hello, ", ["\n\nWorld", " again"], ["\n\nWorld", " again"], id="other-whitespace-kept"),
        pytest.param("Code:\n", ["\n    x = 1"], ["    x = 1"], id="only-the-held-part-dropped"),
        pytest.param("Hello", [" world"], [" world"], id="no-trailing-whitespace"),
    ],
)
def test_a_continued_prefill_does_not_repeat_its_whitespace(
    prefill: str, deltas: list[str], content: list[str]
) -> None:
    body = chat(user("Go on."), assistant(prefill))
    decoder = ADAPTER.stream_decoder(body)
    events = [message_start(), block_start(0, {"type": "text", "text": ""})]
    events += [text_delta(0, delta) for delta in deltas]
    chunks = decode(decoder, sse(*events))
    assert [item["choices"][0]["delta"]["content"] for item in chunks[1:]] == content


def test_a_tool_call_ends_the_prefill_junction() -> None:
    decoder = AnthropicStreamDecoder(prefill_whitespace=" ")
    events = [
        message_start(),
        block_start(0, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
        block_stop(0),
        block_start(1, {"type": "text", "text": " done"}),
    ]
    assert decode(decoder, sse(*events))[-1] == chunk({"content": " done"})


@given(
    held=st.text(alphabet=" \n\t", max_size=4),
    answer=st.text(alphabet=" \nab", max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=12), max_size=4),
)
def test_the_junction_does_not_depend_on_how_the_answer_is_cut(held: str, answer: str, cuts: list[int]) -> None:
    bounds = [0, *sorted(cut for cut in cuts if cut <= len(answer)), len(answer)]
    pieces = [answer[start:end] for start, end in zip(bounds, bounds[1:])]
    decoder = AnthropicStreamDecoder(prefill_whitespace=held)
    events = [message_start()] + [text_delta(0, piece) for piece in pieces]
    streamed = "".join(item["choices"][0]["delta"].get("content", "") for item in decode(decoder, sse(*events)))
    # what is dropped is exactly the longest start of the answer that repeats the held whitespace
    dropped = len(answer) - len(streamed)
    assert answer[dropped:] == streamed
    assert answer[:dropped] == held[:dropped]
    assert dropped == len(held) or dropped == len(answer) or answer[dropped] != held[dropped]


# -- against the mock provider ----------------------------------------------------------


async def _stream_through(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, AnthropicStreamDecoder]:
    upstream = ADAPTER.request(body, stream=True)
    decoder = ADAPTER.stream_decoder(body)
    events = SSEDecoder()
    text: list[str] = []
    async with client.stream("POST", upstream.url, content=upstream.content, headers=upstream.headers) as response:
        assert response.status_code == 200
        async for piece in response.aiter_bytes():
            for event in events.feed(piece):
                text.extend(item["choices"][0]["delta"].get("content") or "" for item in decoder.feed(event))
    return "".join(text), decoder


async def test_the_mock_answers_the_same_text_whole_streamed_and_continued(mock_client: httpx.AsyncClient) -> None:
    body = chat({"role": "system", "content": "Be brief."}, user("Tell me about gateways."), temperature=1.5)
    upstream = ADAPTER.request(body, stream=False)
    response = await mock_client.post(upstream.url, content=upstream.content, headers=upstream.headers)
    whole = ADAPTER.completion(response.content)["choices"][0]["message"]["content"]

    streamed, decoder = await _stream_through(mock_client, body)
    assert streamed == whole
    assert (decoder.done, decoder.finish_reason) == (True, "stop")

    # A broken stream continued from text that ends in a space: the prefill goes without
    # it, the mock's continuation starts with it, and the decoder drops the repetition.
    delivered = whole[: whole.index(" ", 5) + 1]
    continued = chat(*body["messages"], assistant(delivered), temperature=1.5)
    rest, _ = await _stream_through(mock_client, continued)
    assert delivered + rest == whole
