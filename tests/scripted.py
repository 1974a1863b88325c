"""A scripted upstream for router tests: each provider host answers from a queue of actions.

Runs as an ``httpx.MockTransport`` (async handler), so stalls are trio sleeps and the
autojump clock makes every timing exact. Once a host's queue is empty it answers OK.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import attrs
import httpx
import orjson
import trio

from orchestrator.config import Config


def completion(model: str, text: str = "hello there") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


@attrs.frozen
class Reply:
    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)
    body: dict[str, Any] | None = None
    stall: float = 0.0  # seconds of silence before answering
    reset: bool = False  # connection dropped instead of an answer


OK = Reply()


def error(status: int, message: str = "upstream trouble", code: str | None = None, **headers: str) -> Reply:
    return Reply(status, {k.replace("_", "-"): v for k, v in headers.items()},
                 {"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def stall(seconds: float, then: Reply = OK) -> Reply:
    return attrs.evolve(then, stall=seconds)


RESET = Reply(reset=True)


class ScriptedUpstream:
    """Per-host queues of replies, and a log of (time, host) for every request received."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Reply]] = defaultdict(deque)
        self.received: list[tuple[float, str]] = []
        self.cancelled: list[tuple[float, str]] = []
        self.transport = httpx.MockTransport(self._handle)

    def script(self, host: str, *replies: Reply) -> None:
        self.queues[host].extend(replies)

    def calls(self, host: str) -> list[float]:
        return [when for when, name in self.received if name == host]

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.received.append((trio.current_time(), host))
        queue = self.queues[host]
        reply = queue.popleft() if queue else OK
        try:
            if reply.stall:
                await trio.sleep(reply.stall)
        except trio.Cancelled:
            self.cancelled.append((trio.current_time(), host))
            raise
        if reply.reset:
            raise httpx.ReadError("connection reset by peer")
        body = reply.body
        if body is None:
            body = completion(orjson.loads(request.content)["model"])
        return httpx.Response(reply.status, headers=reply.headers, content=orjson.dumps(body))


def two_provider_config(**overrides: Any) -> Config:
    """openai-kind providers "primary" and "backup" on hosts of the same names, route gpt-*."""
    retry = overrides.pop("retry", {})
    provider_settings = overrides.pop("provider", {})
    return Config.from_mapping(
        {
            "seed": 1,
            "retry": retry,
            "providers": {
                "primary": {"kind": "openai", "base_url": "http://primary/v1", **provider_settings},
                "backup": {"kind": "openai", "base_url": "http://backup/v1", **provider_settings},
            },
            "routes": [{"match": "gpt-*", "deployments": [{"provider": "primary"}, {"provider": "backup"}]}],
            **overrides,
        }
    )


REQUEST = {"model": "gpt-4", "messages": [{"role": "user", "content": "test"}]}
