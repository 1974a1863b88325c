"""The OpenAI personality: ``POST /v1/chat/completions`` as the official SDK expects it."""

from __future__ import annotations

import time

import orjson

from .conversation import ChatRequest, Completion, count_tokens
from .wire import InvalidRequest, StreamScript, sse, sse_series

__all__ = ["OPENAI", "OpenAIPersonality"]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# (type, code, usual message) by status, as OpenAI's API sends them.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    404: ("invalid_request_error", None, "Invalid URL."),
    405: ("invalid_request_error", None, "Method not allowed."),
    413: ("invalid_request_error", None, "Request body too large."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    501: ("server_error", None, "Not implemented by this server."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", "timeout", "Request timed out."),
}  # fmt: skip


class OpenAIPersonality:
    name = "openai"
    path = "/v1/chat/completions"
    server_error_statuses = (500, 503)

    def parse_request(self, body: object, *, prefill_supported: bool) -> ChatRequest:
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("You must provide a model parameter.", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array.", "messages")
        conversation = [_message(index, message) for index, message in enumerate(messages)]

        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean.", "stream")
        include_usage = False
        stream_options = body.get("stream_options")
        if stream_options is not None:
            if not stream:
                raise InvalidRequest(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    "stream_options",
                )
            if not isinstance(stream_options, dict):
                raise InvalidRequest("'stream_options' must be an object.", "stream_options")
            include_usage = stream_options.get("include_usage", False)
            if not isinstance(include_usage, bool):
                raise InvalidRequest(
                    "'include_usage' must be a boolean.", "stream_options.include_usage"
                )

        max_tokens = _max_tokens(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _max_tokens(body, "max_tokens")

        prefill = None
        if conversation[-1][0] == "assistant":
            if not prefill_supported:
                raise InvalidRequest(
                    "This model does not support assistant message prefill: "
                    "the last message must not be from the assistant.",
                    "messages",
                )
            prefill = conversation[-1][1]
        prompt = next((text for role, text in reversed(conversation) if role == "user"), "")
        return ChatRequest(
            model=model,
            prompt=prompt,
            prefill=prefill,
            prompt_tokens=sum(count_tokens(text) for _, text in conversation),
            max_tokens=max_tokens,
            stream=bool(stream),
            include_usage=include_usage,
        )

    def response_id(self, serial: int) -> str:
        return f"chatcmpl-mock{serial:010d}"

    def response_body(
        self, request: ChatRequest, completion: Completion, response_id: str
    ) -> bytes:
        return orjson.dumps(
            {
                "id": response_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": completion.text,
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": completion.finish.value,
                    }
                ],
                "usage": _usage(completion),
                "system_fingerprint": None,
            }
        )

    def stream_script(
        self, request: ChatRequest, completion: Completion, response_id: str
    ) -> StreamScript:
        created = int(time.time())

        def chunk_data(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, object]:
            return {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
            return sse(chunk_data(delta, finish_reason))

        tail = chunk({}, completion.finish.value)
        if request.include_usage:
            tail += sse(
                {
                    "id": response_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": request.model,
                    "choices": [],
                    "usage": _usage(completion),
                }
            )
        return StreamScript(
            head=chunk({"role": "assistant", "content": ""}),
            pieces=sse_series(lambda piece: chunk_data({"content": piece}), completion.pieces),
            tail=tail,
            end=b"data: [DONE]\n\n",
            malformed=b'data: {"id": "' + response_id.encode() + b'", "choices": [{"delta": \n\n',
        )

    def error_body(
        self, status: int, message: str | None = None, param: str | None = None
    ) -> bytes:
        error_type, code, usual = _ERRORS.get(status, ("invalid_request_error", None, "Error."))
        return orjson.dumps(
            {
                "error": {
                    "message": message or usual,
                    "type": error_type,
                    "param": param,
                    "code": code,
                }
            }
        )


OPENAI = OpenAIPersonality()


def _message(index: int, message: object) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object.", where)
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(sorted(_ROLES))}.", f"{where}.role"
        )
    return role, _content_text(message.get("content"), f"{where}.content")


def _content_text(content: object, where: str) -> str:
    """The text of a message's content: a string, null, or an array of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or an array of content parts.", where)
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(f"{where}[{index}] must be a content part object.", where)
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}[{index}].text must be a string.", where)
            texts.append(text)
    return "".join(texts)


def _max_tokens(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{name}' must be a positive integer.", name)
    return value


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }
