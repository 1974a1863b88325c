"""The OpenAI wire format: chat completions at any OpenAI-compatible base URL.

Works with OpenAI itself and with servers that copy its API (vLLM, Ollama, the
mock). Requests pass through nearly as they are; streams are always asked for
with usage (``stream_options.include_usage``) so the gateway can account for
what it delivers, whatever the client asked.
"""

from __future__ import annotations

from typing import Any

import orjson

from orchestrator.config import ProviderConfig
from providers.adapter import (
    MalformedResponse,
    MalformedStream,
    ProviderError,
    ProviderStreamError,
    UpstreamRequest,
    dump_json,
    load_json_object,
)
from providers.sse import ServerSentEvent

__all__ = ["OpenAIAdapter", "OpenAIStreamDecoder", "openai_error"]


class OpenAIAdapter:
    kind = "openai"

    def __init__(self, config: ProviderConfig) -> None:
        self._url = f"{config.base_url}/chat/completions"
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if config.api_key:
            self._headers["authorization"] = f"Bearer {config.api_key}"
        self._stream_headers = {**self._headers, "accept": "text/event-stream"}

    def request(self, body: dict[str, Any], *, stream: bool) -> UpstreamRequest:
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            return UpstreamRequest(self._url, self._stream_headers, dump_json(body))
        return UpstreamRequest(self._url, self._headers, dump_json(body))

    def completion(self, payload: bytes, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = load_json_object(payload, "the completion")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise MalformedResponse("the completion has no choices")
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                raise MalformedResponse("a completion choice has no message")
        return data

    def error(self, status: int, payload: bytes) -> ProviderError:
        return openai_error(status, payload)

    def stream_decoder(self, body: dict[str, Any] | None = None) -> OpenAIStreamDecoder:
        return OpenAIStreamDecoder()


def openai_error(status: int, payload: bytes) -> ProviderError:
    """Understand an OpenAI-style error body (``{"error": {...}}``), or describe the status."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str):  # some compatible servers send {"error": "text"}
        error = {"message": error}
    if not isinstance(error, dict):
        message = f"HTTP {status}"
        return ProviderError(message, status=status, openai_error={"message": message, "type": None, "param": None, "code": None})
    message = str(error.get("message") or f"HTTP {status}")
    code = error.get("code")
    error_type = error.get("type")
    return ProviderError(
        message,
        code=str(code) if code is not None else None,
        error_type=str(error_type) if error_type is not None else None,
        status=status,
        openai_error={
            "message": message,
            "type": error_type,
            "param": error.get("param"),
            "code": code,
        },
    )


class OpenAIStreamDecoder:
    """OpenAI chunks in, OpenAI chunks out: checks them, collects usage and finish."""

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, event: ServerSentEvent) -> list[dict[str, Any]]:
        data = event.data
        if data == "[DONE]":
            self.done = True
            return []
        if self.done:
            raise MalformedStream("data after [DONE]")
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedStream("a stream chunk is not valid JSON") from None
        if not isinstance(chunk, dict):
            raise MalformedStream("a stream chunk is not a JSON object")
        if "error" in chunk:
            raise ProviderStreamError(openai_error(500, data.encode()))
        usage = chunk.pop("usage", None)
        if usage is not None:
            if not isinstance(usage, dict):
                raise MalformedStream("a stream chunk has a malformed usage")
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise MalformedStream("a stream chunk has no choices")
        if not choices:
            return []  # the usage chunk: kept, the router emits it if the client asked
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("delta", {}), dict):
                raise MalformedStream("a stream chunk has a malformed choice")
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                self.finish_reason = finish_reason
        return [chunk]
