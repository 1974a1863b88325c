"""What the two personalities have in common on the wire.

A personality (``openai_wire.OPENAI``, ``anthropic_wire.ANTHROPIC``) turns a decoded
request body into a ``ChatRequest`` (or raises ``InvalidRequest``), and a ``Completion``
into a response body or a ``StreamScript``; it also renders errors in its own format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import attrs
import orjson

from .conversation import ChatRequest, Completion

__all__ = ["InvalidRequest", "Personality", "StreamScript", "sse", "sse_event", "sse_series"]


class InvalidRequest(Exception):
    """The client sent something the personality rejects with 400.

    ``message`` is complete as the client should read it; ``param`` names the offending
    field where the personality's error format has room for it (OpenAI's does).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@attrs.frozen
class StreamScript:
    """A streamed response, rendered as server-sent events, in the order they are sent.

    The app plays it: ``head`` at once, then ``pieces`` (one per token), then ``tail``
    and ``end``; faults cut, pause or corrupt the play, never the script.
    """

    #: Everything before the first token: OpenAI's role chunk; Anthropic's
    #: message_start, content_block_start and a ping.
    head: bytes
    #: One content event per token.
    pieces: tuple[bytes, ...]
    #: After the content: OpenAI's finish chunk (and usage chunk); Anthropic's
    #: content_block_stop and message_delta.
    tail: bytes
    #: The terminator: ``data: [DONE]`` or message_stop.
    end: bytes
    #: An event whose data is not valid JSON, for the malformed_chunk fault.
    malformed: bytes


class Personality(Protocol):
    name: str
    path: str
    #: Statuses a server_error fault picks from; the first is the forced one.
    server_error_statuses: tuple[int, ...]

    def parse_request(self, body: object, *, prefill_supported: bool) -> ChatRequest:
        """Validate a decoded body; raises ``InvalidRequest``."""
        ...

    def response_id(self, serial: int) -> str: ...

    def response_body(
        self, request: ChatRequest, completion: Completion, response_id: str
    ) -> bytes: ...

    def stream_script(
        self, request: ChatRequest, completion: Completion, response_id: str
    ) -> StreamScript: ...

    def error_body(
        self, status: int, message: str | None = None, param: str | None = None
    ) -> bytes:
        """An error in this personality's format; ``message`` None: the status's usual one."""
        ...


def sse(data: object) -> bytes:
    """One server-sent event carrying ``data`` as JSON, without an event name."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


def sse_event(event: str, data: object) -> bytes:
    """One named server-sent event carrying ``data`` as JSON."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


#: Where the value of a series goes in its one rendered event (see ``sse_series``).
#: Private-use characters: no value this mock renders contains them, except by a
#: client's design, and that is caught.
_SLOT = "\ue000slot\ue000"
_ENCODED_SLOT = orjson.dumps(_SLOT)


def sse_series(data_for: Callable[[str], object], values: Iterable[str], event: str | None = None) -> tuple[bytes, ...]:
    """One event per value, each carrying ``data_for(value)``: byte for byte what
    ``sse`` (``sse_event`` when ``event`` is named) makes of each, at a fraction of
    the cost.

    A stream's content events differ in their text alone, and encoding the whole of
    each one was most of what a streamed answer cost the mock's own code. Here the data
    is encoded once, around a placeholder string, and each event is the bytes before
    it, the value encoded as a JSON string, and the bytes after it. A placeholder that
    is not found exactly once (a client's model name that contains it) falls back to
    encoding each event whole.
    """
    def render(value: str) -> bytes:
        data = data_for(value)
        return sse(data) if event is None else sse_event(event, data)

    before, found, after = render(_SLOT).partition(_ENCODED_SLOT)
    if not found or _ENCODED_SLOT in after:
        return tuple(render(value) for value in values)
    return tuple(before + orjson.dumps(value) + after for value in values)
