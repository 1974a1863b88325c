"""Test support: send a model request and classify what came back, from the client's side.

``observe`` sends one request (OpenAI's or Anthropic's) and records the status, the
body and every server-sent event with the time it arrived; ``Observation.kind()`` names
what happened with the mock's fault kinds -- ``"ok"``, ``"timeout"``, ``"stream_cut"``,
... -- judging only by what a client can see (status, bytes, timing), never by the
mock's own statistics, so a test comparing the two can fail. Timing is read from
``trio.current_time()``: under ``MockClock`` it is exact.

It works on any server speaking those formats, the gateway included.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from typing import Any

import attrs
import httpx
import orjson
import trio

__all__ = ["MALFORMED", "PATHS", "Event", "Observation", "body_for", "observe", "tally"]

PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}

#: ``Event.data`` of an event whose data line is not JSON.
MALFORMED: Any = type("Malformed", (), {"__repr__": lambda self: "MALFORMED"})()


def body_for(
    personality: str, *, stream: bool = False, content: str = "test", **fields: Any
) -> dict:
    """A minimal valid request body for ``personality``; ``fields`` are added or replace."""
    body: dict[str, Any] = {"model": "gpt-4", "messages": [{"role": "user", "content": content}]}
    if personality == "anthropic":
        body.update(model="claude-3-5-sonnet", max_tokens=1024)
    if stream:
        body["stream"] = True
    return {**body, **fields}


@attrs.frozen
class Event:
    """One server-sent event and when it arrived (seconds after the request was sent)."""

    at: float
    raw: bytes

    @property
    def data(self) -> Any:
        """The event's data: decoded JSON, ``"[DONE]"``, ``MALFORMED``, or None."""
        for line in self.raw.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[len(b"data: ") :]
                if payload == b"[DONE]":
                    return "[DONE]"
                try:
                    return orjson.loads(payload)
                except orjson.JSONDecodeError:
                    return MALFORMED
        return None


@attrs.frozen
class Observation:
    """What one request got back."""

    personality: str
    #: None when the connection failed (reset) before a response.
    status: int | None
    headers: httpx.Headers
    #: Seconds from sending to the end of the body (or to the failure).
    elapsed: float
    #: Seconds from sending to the response head.
    head_at: float | None
    body: bytes
    #: The events of a text/event-stream body; empty for any other.
    events: tuple[Event, ...]
    error: Exception | None

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def content_events(self) -> list[Event]:
        return [event for event in self.events if _is_content(self.personality, event.data)]

    @property
    def text(self) -> str:
        """The streamed text, or the text of a non-streaming reply."""
        if not self.events:
            reply = self.json
            if self.personality == "openai":
                return reply["choices"][0]["message"]["content"]
            return "".join(block["text"] for block in reply["content"])
        return "".join(_content_text(self.personality, event.data) for event in self.content_events)

    def kind(self, *, slow: float = 5.0, stall: float = 30.0) -> str:
        """Name what happened as the mock's fault kinds; ``"ok"`` when nothing did.

        ``slow`` and ``stall`` are the delays that count as a slow first token and as a
        stall (the profile's defaults unless given). Other statuses read ``"status N"``.
        """
        if self.status is None:
            return "reset"
        if self.status == 504:
            return "timeout"
        if self.status == 429:
            return "rate_limit"
        if self.status >= 500:
            return "server_error"
        if self.status != 200:
            return f"status {self.status}"
        if not self.events:
            return "slow_first_token" if self.elapsed >= slow else "ok"
        data = [event.data for event in self.events]
        if any(item is MALFORMED for item in data):
            return "malformed_chunk"
        finished = any(_is_finish(self.personality, item) for item in data)
        terminated = _TERMINATORS[self.personality] in data
        if not finished and not terminated:
            return "stream_cut"
        if not terminated:
            return "no_done"
        content = self.content_events
        if content and self.head_at is not None and content[0].at - self.head_at >= slow:
            return "slow_first_token"
        gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(content)]
        if gaps and max(gaps) >= stall:
            return "stream_stall"
        return "ok"


async def observe(
    client: httpx.AsyncClient,
    personality: str,
    *,
    stream: bool = False,
    fault: str | None = None,
    body: dict | None = None,
    path: str | None = None,
) -> Observation:
    """Send one model request and record the answer; blocks until the body ends.

    ``fault`` is sent as ``x-mock-fault``; ``body`` defaults to ``body_for``; ``path``
    to the personality's. A transport error becomes an observation with status None.
    """
    headers = {} if fault is None else {"x-mock-fault": fault}
    body = body_for(personality, stream=stream) if body is None else body
    start = trio.current_time()
    events: list[Event] = []
    received = b""
    head_at = None
    try:
        async with client.stream(
            "POST", path or PATHS[personality], json=body, headers=headers
        ) as response:
            head_at = trio.current_time() - start
            pending = b""
            async for chunk in response.aiter_raw():
                now = trio.current_time() - start
                received += chunk
                pending += chunk
                *complete, pending = pending.split(b"\n\n")
                events.extend(Event(now, raw) for raw in complete)
    except httpx.TransportError as error:
        return Observation(
            personality,
            None,
            httpx.Headers(),
            trio.current_time() - start,
            head_at,
            received,
            (),
            error,
        )
    is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
    return Observation(
        personality,
        response.status_code,
        response.headers,
        trio.current_time() - start,
        head_at,
        received,
        tuple(events) if is_sse else (),
        None,
    )


def tally(observations: Iterable[Observation], **thresholds: float) -> Counter[str]:
    """How many observations of each kind (``thresholds`` as for ``Observation.kind``)."""
    return Counter(observation.kind(**thresholds) for observation in observations)


_TERMINATORS: dict[str, Any] = {"openai": "[DONE]", "anthropic": {"type": "message_stop"}}


def _is_content(personality: str, data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    if personality == "openai":
        choices = data.get("choices") or [{}]
        delta = choices[0].get("delta", {})
        return "content" in delta and "role" not in delta
    return data.get("type") == "content_block_delta"


def _content_text(personality: str, data: Any) -> str:
    if personality == "openai":
        return data["choices"][0]["delta"]["content"]
    return data["delta"]["text"]


def _is_finish(personality: str, data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    if personality == "openai":
        return any(choice.get("finish_reason") for choice in data.get("choices", []))
    return data.get("type") == "message_delta"
