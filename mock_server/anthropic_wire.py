"""The Anthropic personality: ``POST /v1/messages`` as the official SDK expects it."""

from __future__ import annotations

import orjson

from .conversation import ChatRequest, Completion, Finish, count_tokens
from .wire import InvalidRequest, StreamScript, sse_event, sse_series

__all__ = ["ANTHROPIC", "AnthropicPersonality"]

_ROLES = frozenset({"user", "assistant"})
_STOP_REASONS = {Finish.STOP: "end_turn", Finish.LENGTH: "max_tokens"}

# (type, usual message) by status, as Anthropic's API sends them.
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    404: ("not_found_error", "Not found."),
    405: ("invalid_request_error", "Method not allowed."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    501: ("api_error", "Not implemented by this server."),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}  # fmt: skip


class AnthropicPersonality:
    name = "anthropic"
    path = "/v1/messages"
    server_error_statuses = (500, 529)

    def parse_request(self, body: object, *, prefill_supported: bool) -> ChatRequest:
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model: Field required", "model")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise InvalidRequest("max_tokens: Field required", "max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest("max_tokens: Input should be a positive integer", "max_tokens")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages: at least one message is required", "messages")
        conversation = [_message(index, message) for index, message in enumerate(messages)]
        system = _text(body.get("system"), "system")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("stream: Input should be a valid boolean", "stream")

        prefill = None
        if conversation[-1][0] == "assistant":
            if not prefill_supported:
                raise InvalidRequest(
                    "messages: this model does not support assistant message prefill",
                    "messages",
                )
            prefill = conversation[-1][1]
            if prefill != prefill.rstrip():
                # As the real API: the continuation brings its own leading space.
                raise InvalidRequest(
                    "messages: final assistant content cannot end with trailing whitespace",
                    "messages",
                )
        prompt = next((text for role, text in reversed(conversation) if role == "user"), "")
        return ChatRequest(
            model=model,
            prompt=prompt,
            prefill=prefill,
            prompt_tokens=count_tokens(system) + sum(count_tokens(t) for _, t in conversation),
            max_tokens=max_tokens,
            stream=bool(stream),
        )

    def response_id(self, serial: int) -> str:
        return f"msg_mock{serial:016d}"

    def response_body(
        self, request: ChatRequest, completion: Completion, response_id: str
    ) -> bytes:
        content = [{"type": "text", "text": completion.text}] if completion.pieces else []
        return orjson.dumps(
            {
                "id": response_id,
                "type": "message",
                "role": "assistant",
                "model": request.model,
                "content": content,
                "stop_reason": _STOP_REASONS[completion.finish],
                "stop_sequence": None,
                "usage": {
                    "input_tokens": completion.prompt_tokens,
                    "output_tokens": completion.completion_tokens,
                },
            }
        )

    def stream_script(
        self, request: ChatRequest, completion: Completion, response_id: str
    ) -> StreamScript:
        message = {
            "id": response_id,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": completion.prompt_tokens, "output_tokens": 0},
        }
        head = (
            sse_event("message_start", {"type": "message_start", "message": message})
            + sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            + sse_event("ping", {"type": "ping"})
        )
        tail = sse_event(
            "content_block_stop", {"type": "content_block_stop", "index": 0}
        ) + sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _STOP_REASONS[completion.finish], "stop_sequence": None},
                "usage": {"output_tokens": completion.completion_tokens},
            },
        )
        return StreamScript(
            head=head,
            pieces=sse_series(
                lambda piece: {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
                completion.pieces,
                event="content_block_delta",
            ),
            tail=tail,
            end=sse_event("message_stop", {"type": "message_stop"}),
            malformed=(
                b"event: content_block_delta\n"
                b'data: {"type": "content_block_delta", "index": 0, "delta": \n\n'
            ),
        )

    def error_body(
        self, status: int, message: str | None = None, param: str | None = None
    ) -> bytes:
        error_type, usual = _ERRORS.get(status, ("api_error", "Error."))
        return orjson.dumps(
            {"type": "error", "error": {"type": error_type, "message": message or usual}}
        )


ANTHROPIC = AnthropicPersonality()


def _message(index: int, message: object) -> tuple[str, str]:
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where}: Input should be a valid dictionary", where)
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidRequest(
            f"{where}.role: Input should be 'user' or 'assistant'", f"{where}.role"
        )
    if "content" not in message:
        raise InvalidRequest(f"{where}.content: Field required", f"{where}.content")
    return role, _text(message["content"], f"{where}.content")


def _text(content: object, where: str) -> str:
    """The text of a content field: absent, a string, or a list of blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: Input should be a valid string or list of blocks", where)
    texts = []
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest(f"{where}.{index}: Input should be a valid content block", where)
        if block["type"] == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}.{index}.text: Input should be a valid string", where)
            texts.append(text)
    return "".join(texts)
