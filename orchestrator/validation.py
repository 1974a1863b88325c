"""Request validation: a request that cannot succeed fails here, before any provider call.

:func:`parse_body` turns raw bytes into a JSON object and :func:`validate_chat_request`
checks it against OpenAI's chat-completions rules, raising
:class:`~orchestrator.errors.InvalidRequest` whose ``param`` names the field
(``messages[2].content``). Both are pure and fast: no I/O, no await.

Fields that would steer the upstream (``api_base``, ``base_url``, ``api_key`` and
friends) are refused wherever they appear in the body: the gateway alone decides
where a request goes and with which key. So is nesting deeper than
:data:`MAX_NESTING`, which the adapters could not write upstream.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import orjson

from orchestrator.errors import InvalidRequest

__all__ = ["ChatRequest", "parse_body", "parse_request_timeout", "validate_chat_request"]

STEERING_FIELDS = frozenset(
    {"api_base", "base_url", "api_key", "api_version", "azure_endpoint", "api_type", "custom_llm_provider"}
)
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
USER_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file"})
MAX_STOP_SEQUENCES = 4
#: Deepest nesting of objects and arrays a body may have, the body itself being level 1.
#: orjson reads up to 1024 levels but writes only 254 ("Recursion limit reached"), and
#: it writes the upstream body: a body in between would pass here and fail in the
#: adapter, after the request was accepted. The margin covers the levels an adapter
#: wraps around the client's values (Anthropic's content blocks); no real request,
#: JSON schemas included, comes near it.
MAX_NESTING = 128
#: A body too deep is blamed on its field at most this many levels down, the body
#: being level 1: ``tools[0].function.parameters``, not a path 128 keys long.
FIELD_LEVELS = 5
#: Characters a model name may not hold, as a regex class that Python and ECMA (the
#: OpenAPI document's) read alike. The name is logged on every line of a journey:
#: these would forge a line (C0 controls, CR and LF among them, DEL, C1 controls, NEL
#: among them, the line and paragraph separators) or disguise one (bidi controls).
MODEL_FORBIDDEN = r"[\u0000-\u001f\u007f-\u009f\u200e\u200f\u2028-\u202e\u2066-\u2069]"
_MODEL_FORBIDDEN = re.compile(MODEL_FORBIDDEN)


@attrs.frozen
class ChatRequest:
    """A validated chat-completions request.

    ``body`` holds what is forwarded upstream: every field the client set, except
    ``stream`` and ``stream_options`` (the adapters set those) and explicit nulls.
    """

    model: str
    body: dict[str, Any]
    stream: bool = False
    include_usage: bool = False


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, whatever the Content-Type said."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty: send a JSON object with 'model' and 'messages'.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"The request body is not valid JSON: {error}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def parse_request_timeout(value: str | None) -> float | None:
    """The ``X-Request-Timeout`` header in seconds (None when absent)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequest(
            f"X-Request-Timeout must be a positive number of seconds, got {value!r}.", param="X-Request-Timeout"
        )
    return seconds


def validate_chat_request(body: Mapping[str, Any]) -> ChatRequest:
    """Check ``body`` and return the :class:`ChatRequest` to route."""
    _check_structure(body)
    forwarded: dict[str, Any] = {}
    for name, value in body.items():
        check = _FIELDS.get(name)
        if check is None:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
        if value is None and name not in _REQUIRED:
            continue  # null means "the default", as it does for OpenAI
        normalized = check(name, value)
        forwarded[name] = value if normalized is None else normalized
    for name in _REQUIRED:
        if name not in forwarded:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)

    stream = forwarded.pop("stream", False)
    stream_options = forwarded.pop("stream_options", None)
    if stream_options is not None and not stream:
        raise InvalidRequest("stream_options is only allowed when stream is true.", param="stream_options")
    include_usage = bool(stream_options and stream_options.get("include_usage"))
    if "max_tokens" in forwarded and "max_completion_tokens" in forwarded:
        raise InvalidRequest(
            "Set max_tokens or max_completion_tokens, not both.", param="max_completion_tokens"
        )
    return ChatRequest(model=forwarded["model"], body=forwarded, stream=stream, include_usage=include_usage)


# -- field checks -------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


#: Largest integer a request may carry (what JSON encoders, ours included, can write).
MAX_INTEGER = 2**64 - 1
#: Beyond this a float no longer holds every integer: orjson reads integer literals past
#: 64 bits as floats, rounded, so only exact floats may stand for integers.
MAX_EXACT_FLOAT = 2**53


def _is_integer(value: Any) -> bool:
    # JSON does not tell 5 from 5.0, and JSON Schema's integer accepts both.
    if isinstance(value, float):
        return value.is_integer() and abs(value) <= MAX_EXACT_FLOAT
    return isinstance(value, int) and not isinstance(value, bool)


def _number(low: float, high: float) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not _is_number(value):
            raise InvalidRequest(f"{name} must be a number, got {_describe(value)}.", param=name)
        if not low <= value <= high:
            raise InvalidRequest(f"{name} must be between {low:g} and {high:g}, got {value}.", param=name)

    return check


def _integer(low: int, high: int = MAX_INTEGER) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if not _is_integer(value):
            raise InvalidRequest(f"{name} must be an integer, got {_describe(value)}.", param=name)
        if not low <= value <= high:
            bound = f"at least {low}" if high == MAX_INTEGER else f"between {low} and {high}"
            raise InvalidRequest(f"{name} must be {bound}, got {value}.", param=name)
        return int(value)  # forwarded as an integer, whatever the client wrote

    return check


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {_describe(value)}.", param=name)


def _string(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, got {_describe(value)}.", param=name)


def _object(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be an object, got {_describe(value)}.", param=name)


def _model(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"model must be a non-empty string, got {_describe(value)}.", param="model")
    if len(value) > 256:
        raise InvalidRequest("model must be at most 256 characters.", param="model")
    # Every forbidden character is one str.isprintable refuses: one C scan for the
    # names clients send, the expression only for the rest.
    if not value.isprintable() and _MODEL_FORBIDDEN.search(value):
        raise InvalidRequest(
            "model must not contain control characters (line breaks, NUL, ...) or bidi controls.",
            param="model",
        )


def _stop(name: str, value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequest("stop must be a string or a list of strings.", param=name)
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop may hold at most {MAX_STOP_SEQUENCES} sequences.", param=name)


def _logit_bias(name: str, value: Any) -> None:
    _object(name, value)
    for token, bias in value.items():
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise InvalidRequest(f"{name}[{token}] must be a number between -100 and 100.", param=f"{name}.{token}")


def _stream_options(name: str, value: Any) -> None:
    _object(name, value)
    for key, option in value.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise InvalidRequest(f"Unrecognized stream option: {key}", param=f"{name}.{key}")
        _boolean(f"{name}.{key}", option)


def _tools(name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise InvalidRequest(f"{name} must be a list, got {_describe(value)}.", param=name)
    for index, tool in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequest(f"{where} must be an object with type 'function'.", param=where)
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequest(f"{where}.function.name must be a non-empty string.", param=f"{where}.function.name")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise InvalidRequest(f"{where}.function.parameters must be an object.", param=f"{where}.function.parameters")


def _tool_choice(name: str, value: Any) -> None:
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise InvalidRequest(f"{name} must be 'none', 'auto', 'required' or an object.", param=name)
        return
    _object(name, value)
    function = value.get("function")
    if value.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{name} must name a function: {{'type': 'function', 'function': {{'name': ...}}}}.", param=name)


def _response_format(name: str, value: Any) -> None:
    _object(name, value)
    if value.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(f"{name}.type must be 'text', 'json_object' or 'json_schema'.", param=f"{name}.type")


def _messages(name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise InvalidRequest(f"messages must be a list, got {_describe(value)}.", param="messages")
    if not value:
        raise InvalidRequest("messages must not be empty: send at least one message.", param="messages")
    for index, message in enumerate(value):
        _message(f"messages[{index}]", message)


def _message(where: str, message: Any) -> None:
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object, got {_describe(message)}.", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(ROLES)}, got {_describe(role)}.", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            pass
        elif role in ("assistant", "function"):
            if "content" not in message and role == "assistant":
                raise InvalidRequest(f"{where}.content is required.", param=f"{where}.content")
        else:
            raise InvalidRequest(f"{where}.content is required for role '{role}'.", param=f"{where}.content")
    elif isinstance(content, list):
        allowed = USER_PART_TYPES if role == "user" else frozenset({"text", "refusal"})
        for part_index, part in enumerate(content):
            _content_part(f"{where}.content[{part_index}]", part, allowed)
    elif not isinstance(content, str):
        raise InvalidRequest(
            f"{where}.content must be a string or a list of content parts, got {_describe(content)}.",
            param=f"{where}.content",
        )
    if "name" in message and not isinstance(message["name"], str):
        raise InvalidRequest(f"{where}.name must be a string.", param=f"{where}.name")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequest(f"{where}.tool_call_id is required for role 'tool'.", param=f"{where}.tool_call_id")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant" or not isinstance(tool_calls, list):
            raise InvalidRequest(f"{where}.tool_calls must be a list on an assistant message.", param=f"{where}.tool_calls")
        for call_index, call in enumerate(tool_calls):
            call_where = f"{where}.tool_calls[{call_index}]"
            function = call.get("function") if isinstance(call, dict) else None
            if (
                not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)
            ):
                raise InvalidRequest(
                    f"{call_where} must have function.name and function.arguments strings.", param=call_where
                )


def _content_part(where: str, part: Any, allowed: frozenset[str]) -> None:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{where} must be an object, got {_describe(part)}.", param=where)
    kind = part.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        raise InvalidRequest(
            f"{where}.type must be one of {', '.join(sorted(allowed))}, got {_describe(kind)}.", param=f"{where}.type"
        )
    if kind == "text" and not isinstance(part.get("text"), str):
        raise InvalidRequest(f"{where}.text must be a string.", param=f"{where}.text")
    if kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise InvalidRequest(f"{where}.image_url.url must be a string.", param=f"{where}.image_url.url")


def _strings(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequest(f"{name} must be a list of strings, got {_describe(value)}.", param=name)


def _objects(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidRequest(f"{name} must be a list of objects, got {_describe(value)}.", param=name)


def _function_call(name: str, value: Any) -> None:
    if not isinstance(value, str | dict):
        raise InvalidRequest(f"{name} must be a string or an object, got {_describe(value)}.", param=name)


_FIELDS: Mapping[str, Callable[[str, Any], None]] = {
    "model": _model,
    "messages": _messages,
    "stream": _boolean,
    "stream_options": _stream_options,
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "n": _integer(1, 128),
    "max_tokens": _integer(1),
    "max_completion_tokens": _integer(1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logit_bias": _logit_bias,
    "logprobs": _boolean,
    "top_logprobs": _integer(0, 20),
    "seed": _integer(-(2**63), 2**63 - 1),
    "stop": _stop,
    "user": _string,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "response_format": _response_format,
    "reasoning_effort": _string,
    "service_tier": _string,
    "store": _boolean,
    "metadata": _object,
    "modalities": _strings,
    "audio": _object,
    "prediction": _object,
    "web_search_options": _object,
    "functions": _objects,
    "function_call": _function_call,
}
_REQUIRED = ("model", "messages")


def _check_structure(body: Mapping[str, Any]) -> None:
    """Refuse upstream-steering keys at any depth, and nesting past :data:`MAX_NESTING`.

    One iterative walk does both (bodies can nest deeply): it is the only walk over
    the whole body, free-form fields (tool parameters, metadata, unknown keys of a
    message) included, so the depth bound costs a counter, not a second walk.
    """
    pending: list[tuple[str, Any, int, str]] = [("", body, 1, "")]
    while pending:
        where, value, level, field = pending.pop()
        if level <= FIELD_LEVELS:
            field = where
        elif level > MAX_NESTING:
            raise InvalidRequest(
                f"{field} nests objects and arrays more than {MAX_NESTING} levels deep:"
                " the gateway cannot forward it.",
                param=field,
            )
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and key.lower() in STEERING_FIELDS:
                    raise InvalidRequest(
                        f"{path} is not allowed: the gateway chooses the provider and its credentials.", param=path
                    )
                if isinstance(item, dict | list):
                    pending.append((path, item, level + 1, field))
        else:
            for index, item in enumerate(value):
                if isinstance(item, dict | list):
                    pending.append((f"{where}[{index}]", item, level + 1, field))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"{value!r}" if len(value) <= 40 else "a string"
    if isinstance(value, int | float):
        return repr(value)
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
