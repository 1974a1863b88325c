"""The Anthropic wire format: OpenAI chat requests to the Messages API, and back.

Request, translated:

- ``system`` and ``developer`` messages, wherever they stand, become the top-level
  ``system``: their text, separated by blank lines;
- user text and ``image_url`` parts (an image with a base64 source for ``data:`` URLs,
  a url source otherwise); assistant text and ``tool_calls`` (``tool_use`` blocks);
  ``tool`` messages (``tool_result`` blocks, consecutive ones in one user turn);
- a final assistant message is Anthropic's *prefill*: the answer continues it;
- ``max_completion_tokens`` or ``max_tokens`` (Anthropic requires a limit: the
  provider's ``default_max_tokens`` otherwise), ``temperature`` (clamped to Anthropic's
  0-1), else ``top_p`` (never both: recent models reject that), ``stop``,
  ``safety_identifier`` or ``user``, ``tools``, ``tool_choice`` and
  ``parallel_tool_calls: false``.

Refused with :class:`UnsupportedRequest`, so the router can try a deployment that
honours them: ``n > 1``, ``logprobs``, a JSON ``response_format``, audio output, web
search, the legacy ``functions`` API, non-function tools, content parts other than text
and images, and ``stop`` sequences made only of whitespace (Anthropic rejects them).
Every other field is dropped: penalties, ``logit_bias``, ``seed``, ``stream_options``
(Anthropic always reports usage), ``store``, ``metadata``, ``reasoning_effort``, ...

Answer: text blocks join into the message content and ``tool_use`` blocks become
``tool_calls``; thinking and server-tool blocks have no OpenAI place and are dropped.
Prompt tokens include the cached input tokens, which Anthropic counts apart.

Whitespace at the prefill's end: Anthropic rejects a prefill that ends in whitespace,
so it is stripped. The model then sees ``"Hello,"`` and usually starts ``" world"``,
although whoever holds the prefill (the client, or the router continuing a broken
stream) already has ``"Hello, "``. Given the request's body (``completion(payload,
body)``, ``stream_decoder(body)``), the answer's first characters are dropped while they
repeat the stripped whitespace: when the model repeats it, as it usually does, the
pieces join exactly; when it does not, nothing the holder lacks is dropped.
"""

from __future__ import annotations

import http
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import orjson

from orchestrator.config import ProviderConfig
from providers.adapter import (
    MalformedResponse,
    MalformedStream,
    ProviderError,
    ProviderStreamError,
    UnsupportedRequest,
    UpstreamRequest,
    dump_json,
    load_json_object,
)
from providers.sse import ServerSentEvent

__all__ = ["AnthropicAdapter", "AnthropicStreamDecoder", "anthropic_error", "prefill_whitespace"]

ANTHROPIC_VERSION = "2023-06-01"

#: Anthropic's ``stop_reason`` → OpenAI's ``finish_reason``; one it adds later reads "stop".
FINISH_REASONS: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: The HTTP status each Anthropic error type comes with, for errors inside a stream.
ERROR_TYPE_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

#: The OpenAI error type a client expects for a status; any other is "server_error".
OPENAI_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}

#: Events that belong to a started message: before message_start they break the stream.
_MESSAGE_EVENTS = frozenset(
    {"content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}
)
_IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_CHOICES: Mapping[str, str] = {"auto": "auto", "required": "any", "none": "none"}


class AnthropicAdapter:
    kind = "anthropic"

    def __init__(self, config: ProviderConfig) -> None:
        self._url = f"{config.base_url}/v1/messages"
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
        }
        if config.api_key:
            self._headers["x-api-key"] = config.api_key
        self._stream_headers = {**self._headers, "accept": "text/event-stream"}
        self._default_max_tokens = config.default_max_tokens

    def request(self, body: dict[str, Any], *, stream: bool) -> UpstreamRequest:
        content = dump_json(_messages_request(body, stream=stream, default_max_tokens=self._default_max_tokens))
        return UpstreamRequest(self._url, self._stream_headers if stream else self._headers, content)

    def completion(self, payload: bytes, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The Messages answer as a chat.completion; ``body`` lets it join a prefill."""
        completion = _openai_completion(load_json_object(payload, "the message"))
        message = completion["choices"][0]["message"]
        held = prefill_whitespace(body) if body is not None else ""
        if held and message["content"]:
            message["content"] = _drop_repeated(message["content"], held)[0]
        return completion

    def error(self, status: int, payload: bytes) -> ProviderError:
        return anthropic_error(status, payload)

    def stream_decoder(self, body: Mapping[str, Any] | None = None) -> AnthropicStreamDecoder:
        """A decoder for one stream; ``body`` (the request's) lets it join a prefill."""
        return AnthropicStreamDecoder(prefill_whitespace=prefill_whitespace(body) if body is not None else "")


# -- request ------------------------------------------------------------------------


def _messages_request(body: Mapping[str, Any], *, stream: bool, default_max_tokens: int) -> dict[str, Any]:
    """The Messages API body for a validated OpenAI chat ``body``."""
    _refuse_inexpressible(body)
    system, messages = _conversation(body["messages"])
    request: dict[str, Any] = {
        "model": body["model"],
        "max_tokens": _max_tokens(body, default_max_tokens),
        "messages": messages,
    }
    if system:
        request["system"] = system
    temperature = body.get("temperature")
    if temperature is not None:
        request["temperature"] = min(temperature, 1.0)
    elif body.get("top_p") is not None:
        # Only one of the two: recent Claude models reject both, and Anthropic advises
        # altering only one of them.
        request["top_p"] = body["top_p"]
    stop_sequences = _stop_sequences(body.get("stop"))
    if stop_sequences:
        request["stop_sequences"] = stop_sequences
    user_id = body.get("safety_identifier") or body.get("user")
    if user_id:
        request["metadata"] = {"user_id": user_id}
    tools = body.get("tools")
    if tools:
        request["tools"] = [_tool(index, tool) for index, tool in enumerate(tools)]
        tool_choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if tool_choice is not None:
            request["tool_choice"] = tool_choice
    if stream:
        request["stream"] = True
    return request


def prefill_whitespace(body: Mapping[str, Any]) -> str:
    """The whitespace :meth:`AnthropicAdapter.request` strips from ``body``'s prefill."""
    messages = body.get("messages")
    if not messages or messages[-1].get("role") != "assistant":
        return ""
    text = _joined_text(messages[-1].get("content"))
    return text[len(text.rstrip()) :]


def _refuse_inexpressible(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise UnsupportedRequest("n: Anthropic returns one choice per request, so n > 1 cannot be served")
    if body.get("logprobs"):
        raise UnsupportedRequest("logprobs: Anthropic does not return token log probabilities")
    response_format = body.get("response_format")
    if response_format is not None and response_format.get("type") != "text":
        raise UnsupportedRequest(f"response_format: {response_format.get('type')!r} is not translated to Anthropic")
    if body.get("audio") is not None or "audio" in (body.get("modalities") or ()):
        raise UnsupportedRequest("audio: Anthropic does not produce audio")
    if body.get("web_search_options") is not None:
        raise UnsupportedRequest("web_search_options: web search is not translated to Anthropic")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise UnsupportedRequest("functions: the legacy function-calling API is not translated to Anthropic; use tools")


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    for field in ("max_completion_tokens", "max_tokens"):
        if body.get(field) is not None:
            return body[field]
    return default


def _stop_sequences(stop: str | list[str] | None) -> list[str]:
    sequences = [stop] if isinstance(stop, str) else list(stop or ())
    for sequence in sequences:
        if not sequence.strip():
            raise UnsupportedRequest(f"stop: Anthropic rejects a stop sequence made only of whitespace ({sequence!r})")
    return sequences


def _conversation(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The ``system`` text and the Anthropic ``messages`` of an OpenAI conversation."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] | None = None  # the user turn that tool results join
    last = len(messages) - 1
    for position, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            if tool_results is None:
                tool_results = []
                turns.append({"role": "user", "content": tool_results})
            tool_results.append(_tool_result(position, message))
            continue
        tool_results = None
        if role in ("system", "developer"):
            system.extend(_text_parts(message["content"]))
        elif role == "user":
            turns.append({"role": "user", "content": _user_content(position, message["content"])})
        elif role == "assistant":
            turn = _prefill(position, message) if position == last else _assistant_turn(position, message)
            if turn is not None:
                turns.append(turn)
        else:
            raise UnsupportedRequest(f"messages[{position}].role: {role!r} messages are not translated to Anthropic")
    if not turns:
        raise UnsupportedRequest("messages: Anthropic needs at least one user or assistant message")
    return "\n\n".join(text for text in system if text), turns


def _text_parts(content: str | list[dict[str, Any]] | None) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content if part.get("type") == "text"]


def _joined_text(content: str | list[dict[str, Any]] | None) -> str:
    """An assistant message's text: its parts are consecutive pieces of one answer."""
    return "".join(_text_parts(content))


def _user_content(position: int, content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [_content_block(f"messages[{position}].content[{index}]", part) for index, part in enumerate(content)]


def _content_block(where: str, part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        return {"type": "image", "source": _image_source(where, part["image_url"]["url"])}
    raise UnsupportedRequest(f"{where}: {kind!r} content parts are not translated to Anthropic")


def _image_source(where: str, url: str) -> dict[str, Any]:
    if not url.startswith("data:"):
        return {"type": "url", "url": url}
    header, comma, data = url[5:].partition(",")
    media_type, *parameters = header.split(";")
    if not comma or not parameters or parameters[-1] != "base64":
        raise UnsupportedRequest(f"{where}: Anthropic takes only base64 data URLs")
    if media_type not in _IMAGE_MEDIA_TYPES:
        raise UnsupportedRequest(f"{where}: Anthropic does not take {media_type or 'untyped'} images")
    return {"type": "base64", "media_type": media_type, "data": data}


def _assistant_turn(position: int, message: dict[str, Any]) -> dict[str, Any] | None:
    """An earlier assistant turn; None when it says nothing (Anthropic rejects empty turns)."""
    if message.get("function_call") is not None:
        raise UnsupportedRequest(f"messages[{position}].function_call: legacy function calling is not translated")
    text = _joined_text(message.get("content"))
    tool_calls = message.get("tool_calls")
    if not tool_calls:
        return {"role": "assistant", "content": text} if text else None
    blocks = [{"type": "text", "text": text}] if text else []
    blocks.extend(_tool_use(f"messages[{position}].tool_calls[{index}]", call) for index, call in enumerate(tool_calls))
    return {"role": "assistant", "content": blocks}


def _prefill(position: int, message: dict[str, Any]) -> dict[str, Any] | None:
    """The final assistant turn, which the answer continues: text, no trailing whitespace."""
    if message.get("tool_calls") or message.get("function_call") is not None:
        raise UnsupportedRequest(
            f"messages[{position}]: a final assistant message is continued as a prefill and must be text only"
        )
    # The stripped whitespace is not lost: the decoders drop its repetition, see above.
    text = _joined_text(message.get("content")).rstrip()
    return {"role": "assistant", "content": text} if text else None


def _tool_use(where: str, call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = orjson.loads(function["arguments"])
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise UnsupportedRequest(f"{where}.function.arguments: not a JSON object, so not a tool_use input")
    call_id = call.get("id")
    if not isinstance(call_id, str):
        raise UnsupportedRequest(f"{where}.id: a tool call needs an id, to pair it with its result")
    return {"type": "tool_use", "id": call_id, "name": function["name"], "input": arguments}


def _tool_result(position: int, message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, str) and content is not None:
        content = [_content_block(f"messages[{position}].content[{index}]", part) for index, part in enumerate(content)]
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
    if content:
        result["content"] = content
    return result


def _tool(index: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise UnsupportedRequest(f"tools[{index}].type: {tool.get('type')!r} tools are not translated to Anthropic")
    function = tool["function"]
    translated: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        translated["description"] = function["description"]
    # Anthropic requires a schema where OpenAI lets a function without parameters omit it.
    translated["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return translated


def _tool_choice(choice: str | dict[str, Any] | None, parallel_tool_calls: bool | None) -> dict[str, Any] | None:
    if choice is None:
        if parallel_tool_calls is not False:
            return None  # Anthropic's default is OpenAI's: auto, calls in parallel
        choice = "auto"
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        translated = {"type": _TOOL_CHOICES[choice]}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        translated = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise UnsupportedRequest(f"tool_choice: {choice!r} is not translated to Anthropic")
    if parallel_tool_calls is False and translated["type"] != "none":
        translated["disable_parallel_tool_use"] = True
    return translated


# -- answer -------------------------------------------------------------------------


def _openai_completion(message: dict[str, Any]) -> dict[str, Any]:
    """A Messages API answer as an OpenAI ``chat.completion``; raises :class:`MalformedResponse`."""
    if message.get("type") != "message":
        raise MalformedResponse("the answer is not a message")
    blocks = message.get("content")
    if not isinstance(blocks, list):
        raise MalformedResponse("the message has no content list")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = _object(block, "a content block").get("type")
        if kind == "text":
            texts.append(_string(block, "text", "a text block"))
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block))
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    usage = _object(message.get("usage"), "the message's usage")
    return {
        "id": _string(message, "id", "the message"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": _string(message, "model", "the message"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": _finish_reason(message.get("stop_reason"), "the message"),
                "logprobs": None,
            }
        ],
        "usage": _openai_usage(_prompt_tokens(usage), _tokens(usage, "output_tokens", required=True)),
    }


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    arguments = block.get("input")
    if not isinstance(arguments, dict):
        raise MalformedResponse("a tool_use block has no input object")
    return {
        "id": _string(block, "id", "a tool_use block"),
        "type": "function",
        "function": {"name": _string(block, "name", "a tool_use block"), "arguments": orjson.dumps(arguments).decode()},
    }


def _finish_reason(stop_reason: Any, what: str) -> str:
    if not isinstance(stop_reason, str):
        raise MalformedResponse(f"{what} has no valid stop_reason")
    return FINISH_REASONS.get(stop_reason, "stop")


def _prompt_tokens(usage: dict[str, Any]) -> int:
    """Input tokens, cached ones included: Anthropic counts those apart, OpenAI does not."""
    return (
        _tokens(usage, "input_tokens", required=True)
        + _tokens(usage, "cache_creation_input_tokens")
        + _tokens(usage, "cache_read_input_tokens")
    )


def _openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _tokens(usage: dict[str, Any], key: str, *, required: bool = False) -> int:
    count = usage.get(key)
    if count is None and not required:
        return 0
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise MalformedResponse(f"the usage has no valid {key}")
    return count


# Shape checks shared by answers and streams: they raise MalformedResponse, which the
# stream decoder turns into MalformedStream at its boundary.


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedResponse(f"{what} is not an object")
    return value


def _string(mapping: dict[str, Any], key: str, what: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str):
        raise MalformedResponse(f"{what} has no {key} string")
    return value


def _drop_repeated(text: str, held: str) -> tuple[str, str]:
    """``text`` without its first characters while they repeat ``held``, and what of ``held`` is left.

    What is left is non-empty only when ``text`` ended still matching: the next piece
    of the answer continues the comparison.
    """
    matched = 0
    limit = min(len(text), len(held))
    while matched < limit and text[matched] == held[matched]:
        matched += 1
    if matched < len(text):
        return text[matched:], ""
    return "", held[matched:]


# -- errors -------------------------------------------------------------------------


def anthropic_error(status: int, payload: bytes | str) -> ProviderError:
    """Understand Anthropic's ``{"type": "error", "error": {...}}``, or describe the status."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not _is_error_object(error):
        return _provider_error(status, _describe_status(status), None)
    return _reported_error(status, error)


def _is_error_object(error: Any) -> bool:
    if not isinstance(error, dict):
        return False
    return isinstance(error.get("type"), str) and isinstance(error.get("message") or "", str)


def _reported_error(status: int, error: dict[str, Any]) -> ProviderError:
    """The error Anthropic reported; a missing message is made of its type."""
    return _provider_error(status, error.get("message") or error["type"], error["type"])


def _provider_error(status: int, message: str, error_type: str | None) -> ProviderError:
    return ProviderError(
        message,
        code=error_type,
        error_type=error_type,
        status=status,
        openai_error={
            "message": message,
            "type": OPENAI_ERROR_TYPES.get(status, "server_error"),
            "param": None,
            "code": error_type,
        },
    )


def _describe_status(status: int) -> str:
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


# -- stream -------------------------------------------------------------------------


class AnthropicStreamDecoder:
    """Anthropic's message events in, OpenAI chunks out; collects usage and finish.

    One chunk opens the answer (role), then one per text or tool-input delta, and one
    closes it (finish reason). ``prefill_whitespace`` is what the request stripped from
    its prefill: the answer's repetition of it is dropped (see the module docstring).
    """

    def __init__(self, *, prefill_whitespace: str = "") -> None:
        self.done = False
        self.finish_reason: str | None = None
        self._held_whitespace = prefill_whitespace
        self._started = False
        self._id = ""
        self._model = ""
        self._created = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        #: Anthropic's content block index → the index of OpenAI's tool call.
        self._tool_calls: dict[int, int] = {}

    @property
    def usage(self) -> dict[str, int] | None:
        if not self._started:
            return None
        return _openai_usage(self._prompt_tokens, self._completion_tokens)

    def feed(self, event: ServerSentEvent) -> list[dict[str, Any]]:
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            raise MalformedStream("a stream event is not valid JSON") from None
        if not isinstance(data, dict):
            raise MalformedStream("a stream event is not a JSON object")
        # The JSON names the event too, and is there even when a server omits "event:".
        kind = data.get("type")
        if not isinstance(kind, str):
            raise MalformedStream("a stream event has no type")
        if self.done:
            raise MalformedStream(f"a {kind} event after message_stop")
        try:
            return self._handle(kind, data)
        except MalformedResponse as error:  # the shape checks shared with completion()
            raise MalformedStream(str(error)) from None

    def _handle(self, kind: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        if kind in _MESSAGE_EVENTS:
            if not self._started:
                raise MalformedStream(f"a {kind} event before message_start")
            if kind == "content_block_delta":
                return self._block_delta(data)
            if kind == "content_block_start":
                return self._block_start(data)
            if kind == "message_delta":
                return self._message_delta(data)
            if kind == "message_stop":
                self.done = True
            return []  # message_stop, content_block_stop
        if kind == "message_start":
            return self._message_start(data)
        if kind == "error":
            self._raise_error(data)
        return []  # ping, and events Anthropic adds later

    def _message_start(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if self._started:
            raise MalformedStream("a second message_start")
        message = _object(data.get("message"), "message_start's message")
        self._id = _string(message, "id", "message_start's message")
        self._model = _string(message, "model", "message_start's message")
        usage = _object(message.get("usage"), "message_start's usage")
        self._prompt_tokens = _prompt_tokens(usage)
        self._completion_tokens = _tokens(usage, "output_tokens")
        self._created = int(time.time())
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        index = _index(data)
        block = _object(data.get("content_block"), "content_block_start's block")
        kind = block.get("type")
        if kind == "text":
            return self._content(_string(block, "text", "a text block"))
        if kind != "tool_use":
            return []  # thinking, server tools: nothing OpenAI's chunks can carry
        self._held_whitespace = ""  # past the prefill's junction
        position = self._tool_calls[index] = len(self._tool_calls)
        call = {
            "index": position,
            "id": _string(block, "id", "a tool_use block"),
            "type": "function",
            "function": {"name": _string(block, "name", "a tool_use block"), "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        index = _index(data)
        delta = _object(data.get("delta"), "content_block_delta's delta")
        kind = delta.get("type")
        if kind == "text_delta":
            return self._content(_string(delta, "text", "a text_delta"))
        if kind != "input_json_delta":
            return []  # thinking, signatures, citations
        arguments = _string(delta, "partial_json", "an input_json_delta")
        position = self._tool_calls.get(index)
        if position is None:
            raise MalformedStream(f"an input_json_delta for block {index}, which is no tool_use")
        if not arguments:
            return []
        return [self._chunk({"tool_calls": [{"index": position, "function": {"arguments": arguments}}]})]

    def _message_delta(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        delta = _object(data.get("delta"), "message_delta's delta")
        usage = _object(data.get("usage"), "message_delta's usage")
        self._completion_tokens = _tokens(usage, "output_tokens", required=True)
        if usage.get("input_tokens") is not None:  # newer servers repeat the cumulative input
            self._prompt_tokens = _prompt_tokens(usage)
        stop_reason = delta.get("stop_reason")
        if stop_reason is None:
            return []
        self.finish_reason = _finish_reason(stop_reason, "message_delta")
        return [self._chunk({}, self.finish_reason)]

    def _raise_error(self, data: dict[str, Any]) -> NoReturn:
        error = data.get("error")
        if not _is_error_object(error):
            raise MalformedStream("an error event has no error object")
        raise ProviderStreamError(_reported_error(ERROR_TYPE_STATUS.get(error["type"], 500), error))

    def _content(self, text: str) -> list[dict[str, Any]]:
        if self._held_whitespace:
            text, self._held_whitespace = _drop_repeated(text, self._held_whitespace)
        return [self._chunk({"content": text})] if text else []

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }


def _index(data: dict[str, Any]) -> int:
    index = data.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise MalformedResponse(f"a {data['type']} event has no block index")
    return index
