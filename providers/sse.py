"""An incremental decoder of server-sent events (the ``text/event-stream`` format).

Bytes go in as they arrive from the network, whole events come out. Lines end in
``\\n`` or ``\\r\\n``; ``data:`` lines of one event are joined with ``\\n``; comment
lines (``:``) and ``id:``/``retry:`` fields are ignored; a blank line ends an event.
An event still open when the stream ends is incomplete and is not returned.
"""

from __future__ import annotations

import attrs

__all__ = ["MalformedStream", "ServerSentEvent", "SSEDecoder"]


class MalformedStream(ValueError):
    """The upstream sent something that is not a valid event stream of its format."""


@attrs.frozen
class ServerSentEvent:
    event: str
    data: str


class SSEDecoder:
    """Turns a byte stream into :class:`ServerSentEvent` values; never blocks.

    ``max_event_bytes`` bounds the memory one event may take, so an upstream that
    sends an endless line cannot exhaust ours.
    """

    def __init__(self, *, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._data_bytes = 0
        self._max_event_bytes = max_event_bytes

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are held (useful to detect a cut)."""
        return bool(self._buffer or self._data or self._event)

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[ServerSentEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(ServerSentEvent(self._event or "message", "\n".join(self._data)))
                self._event = ""
                self._data = []
                self._data_bytes = 0
                continue
            self._line(line)
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max_event_bytes:
            raise MalformedStream(f"an event stream line exceeded {self._max_event_bytes} bytes")
        return events

    def _line(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedStream("an event stream line is not valid UTF-8") from None
        if text.startswith(":"):
            return
        field, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data_bytes += len(line)
            if self._data_bytes > self._max_event_bytes:
                raise MalformedStream(f"an event exceeded {self._max_event_bytes} bytes")
            self._data.append(value)
        elif field == "event":
            self._event = value
