"""Request validation: every way a request can be hopeless fails here, naming the field."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.errors import InvalidRequest
from orchestrator.validation import MAX_NESTING, parse_body, parse_request_timeout, validate_chat_request

USER = [{"role": "user", "content": "test"}]


def ok(**fields):
    return validate_chat_request({"model": "gpt-4", "messages": USER, **fields})


def refused(body, param):
    with pytest.raises(InvalidRequest) as caught:
        validate_chat_request(body)
    assert caught.value.param == param, caught.value.message
    assert caught.value.status == 400
    assert param.split(".")[0].split("[")[0] in caught.value.message or param in caught.value.message
    return caught.value


def test_a_plain_request_passes_and_keeps_its_fields():
    request = ok(temperature=0.5, max_tokens=10)
    assert request.model == "gpt-4"
    assert request.body == {"model": "gpt-4", "messages": USER, "temperature": 0.5, "max_tokens": 10}
    assert request.stream is False


def test_stream_fields_are_taken_out_of_the_forwarded_body():
    request = ok(stream=True, stream_options={"include_usage": True})
    assert request.stream is True and request.include_usage is True
    assert "stream" not in request.body and "stream_options" not in request.body


def test_nulls_mean_defaults_and_are_dropped():
    assert "temperature" not in ok(temperature=None).body


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not valid JSON"),
        (b'{"model": NaN}', "not valid JSON"),
        (b'{"t": 1e400}', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
    ],
)
def test_bodies_that_are_not_json_objects(raw, fragment):
    with pytest.raises(InvalidRequest) as caught:
        parse_body(raw)
    assert fragment in caught.value.message


def test_the_seed_body_parses():
    body = parse_body(b'{\n  "model":"gpt-4",\n  "messages":[{"role":"user","content":"test"}]\n}')
    assert validate_chat_request(body).model == "gpt-4"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": USER}, "model"),
        ({"model": 4, "messages": USER}, "model"),
        ({"model": "", "messages": USER}, "model"),
        ({"model": None, "messages": USER}, "model"),
        ({"model": "gpt-4"}, "messages"),
        ({"model": "gpt-4", "messages": []}, "messages"),
        ({"model": "gpt-4", "messages": "hello"}, "messages"),
        ({"model": "gpt-4", "messages": {"role": "user"}}, "messages"),
        ({"model": "gpt-4", "messages": ["hello"]}, "messages[0]"),
        ({"model": "gpt-4", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "gpt-4", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": {"a": 1}}]}, "messages[0].content"),
        ({"model": "gpt-4", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "gpt-4", "messages": [*USER, {"role": "user", "content": [{"type": "video"}]}]},
         "messages[1].content[0].type"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
         "messages[0].content[0].text"),
        ({"model": "gpt-4", "messages": [{"role": "system", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type"),
        ({"model": "gpt-4", "messages": [{"role": "tool", "content": "r"}]}, "messages[0].tool_call_id"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x", "name": 3}]}, "messages[0].name"),
    ],
)
def test_model_and_messages(body, param):
    refused(body, param)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("temperature", True),
        ("temperature", "1"),
        ("top_p", 1.5),
        ("top_p", -1),
        ("n", 0),
        ("n", 1.5),
        ("n", True),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 10.5),
        ("max_tokens", False),
        ("max_completion_tokens", 0),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("top_logprobs", 21),
        ("logprobs", 1),
        ("stream", "true"),
        ("stream", 1),
        ("stop", 5),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [1]),
        ("user", 7),
        ("tools", {"type": "function"}),
        ("tool_choice", "sometimes"),
        ("response_format", {"type": "yaml"}),
        ("parallel_tool_calls", "yes"),
    ],
)
def test_numbers_and_types_outside_openai_ranges(field, value):
    refused({"model": "gpt-4", "messages": USER, field: value}, field if field not in ("response_format",) else f"{field}.type")


@pytest.mark.parametrize("raw", [b"100000000000000000000", b"1e20", b"-9223372036854775809", b"9007199254740994.0"])
def test_integers_too_large_to_carry_are_refused(raw):
    body = parse_body(b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' + raw + b"}")
    with pytest.raises(InvalidRequest) as caught:
        validate_chat_request(body)
    assert caught.value.param == "max_tokens"


def test_whole_floats_are_integers_and_forwarded_as_such():
    request = ok(max_tokens=5.0, n=1.0)
    assert request.body["max_tokens"] == 5 and type(request.body["max_tokens"]) is int
    assert type(request.body["n"]) is int


@pytest.mark.parametrize("kind", [{"a": 1}, ["text"], 3])
def test_unhashable_or_odd_content_part_types_are_refused(kind):
    refused({"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": kind}]}]},
            "messages[0].content[0].type")


@pytest.mark.parametrize("field, value", [("modalities", 1), ("modalities", [1]), ("functions", "f"),
                                          ("function_call", 3)])
def test_fields_adapters_read_are_typed(field, value):
    refused({"model": "gpt-4", "messages": USER, field: value}, field)


def test_infinity_is_refused_when_built_in_python():
    refused({"model": "gpt-4", "messages": USER, "temperature": float("inf")}, "temperature")
    refused({"model": "gpt-4", "messages": USER, "temperature": float("nan")}, "temperature")


def test_stream_options_need_stream():
    refused({"model": "gpt-4", "messages": USER, "stream_options": {"include_usage": True}}, "stream_options")


def test_unknown_fields_are_named():
    error = refused({"model": "gpt-4", "messages": USER, "temprature": 1}, "temprature")
    assert "Unrecognized request argument" in error.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "gpt-4", "messages": USER, "api_base": "http://evil"}, "api_base"),
        ({"model": "gpt-4", "messages": USER, "base_url": "http://evil"}, "base_url"),
        ({"model": "gpt-4", "messages": USER, "api_key": "sk-x"}, "api_key"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x", "api_key": "k"}]}, "messages[0].api_key"),
        ({"model": "gpt-4", "messages": USER, "metadata": {"deep": {"API_BASE": "x"}}}, "metadata.deep.API_BASE"),
        ({"model": "gpt-4", "messages": USER, "tools": [{"type": "function", "function": {"name": "f", "base_url": 1}}]},
         "tools[0].function.base_url"),
    ],
)
def test_fields_that_would_steer_the_upstream_are_refused_at_any_depth(body, param):
    error = refused(body, param)
    assert "not allowed" in error.message


def test_a_steering_key_deep_inside_is_found_without_recursion():
    deep: dict = {}
    node = deep
    for _ in range(MAX_NESTING - 3):  # as deep as the limit lets a body be
        node["x"] = {}
        node = node["x"]
    node["api_key"] = "k"
    error = refused({"model": "gpt-4", "messages": USER, "metadata": deep}, "metadata" + ".x" * (MAX_NESTING - 3)
                    + ".api_key")
    assert "not allowed" in error.message


@pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u202e"])
def test_model_names_with_control_characters_are_refused(char):
    # They would forge or hide log lines: the model name is logged on every line of a journey.
    error = refused({"model": f"gpt-4{char}19:00:00.000 INFO  [req_x] forged", "messages": USER}, "model")
    assert "control" in error.message


def nested(levels: int, inner: dict | None = None) -> dict:
    """An object nested ``levels`` deep, itself included, around ``inner``."""
    value: dict = inner if inner is not None else {}
    for _ in range(levels - 1):
        value = {"x": value}
    return value


def test_nesting_is_bounded_below_what_the_adapters_can_write():
    # tools[0].function.parameters is level 5 of the body: at the limit passes, one more fails.
    def tools(parameters: dict) -> dict:
        return {"model": "gpt-4", "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}

    deepest = nested(MAX_NESTING - 4)
    passed = validate_chat_request(tools(deepest))
    error = refused(tools({"x": deepest}), "tools[0].function.parameters")
    assert str(MAX_NESTING) in error.message
    # What passes can be written upstream, with room for what an adapter wraps around it.
    orjson.dumps(nested(64, passed.body))


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("metadata", nested(300), "metadata.x.x.x"),
        ("messages", [{"role": "user", "content": "x", "extra": [nested(300)]}], "messages[0].extra[0]"),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": nested(300)}}, "response_format.json_schema.schema.x"),
    ],
)
def test_a_body_too_deep_is_blamed_on_its_field(field, value, param):
    refused({"model": "gpt-4", "messages": USER, field: value}, param)


def test_assistant_messages_with_tool_calls_may_have_null_content():
    request = ok(messages=[
        *USER,
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ])
    assert len(request.body["messages"]) == 3


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", ""])
def test_request_timeout_header_must_be_positive_seconds(value):
    with pytest.raises(InvalidRequest) as caught:
        parse_request_timeout(value)
    assert caught.value.param == "X-Request-Timeout"


def test_request_timeout_header():
    assert parse_request_timeout(None) is None
    assert parse_request_timeout("2.5") == 2.5


def test_validation_is_fast():
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "x" * 100}] * 200}
    start = time.perf_counter()
    for _ in range(20):
        validate_chat_request(body)
    # Generous bound (shared CI machines): the budget is "well under 10 ms" per request.
    assert (time.perf_counter() - start) / 20 < 0.010


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["model", "messages", "temperature", "top_p", "n", "stream", "stop", "tools", "max_tokens", "x"]),
    json_values,
))
def test_any_json_body_is_either_valid_or_an_invalid_request(body):
    try:
        request = validate_chat_request(body)
    except InvalidRequest as error:
        assert error.status == 400 and error.message
    else:
        assert request.model and request.body["messages"]
