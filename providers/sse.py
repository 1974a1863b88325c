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
        start = 0 if self._data or self._event else self._single_lines(buffer, events)
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

    def _single_lines(self, buffer: bytes, events: list[ServerSentEvent]) -> int:
        """Decode ``buffer``'s whole events in one step when every one of them is a
        single ``data:`` line ended by a blank line with bare ``\n`` (what OpenAI and
        most servers send: a stream's every chunk); return where the rest begins (0:
        nothing decoded).

        Only called between events. Anything else -- another field, a comment, several
        data lines, ``\r``, bytes that are not UTF-8, an event over the size limit --
        leaves the whole buffer to the line-by-line loop, which decodes it to the same
        events (or fails it the same way). A handful of calls into C for the lot,
        where the loop makes a dozen per line.
        """
        end = buffer.rfind(b"\n\n")
        if end < 0 or end > self._max_event_bytes or not buffer.startswith(b"data:"):
            return 0
        if buffer.find(b"\r", 0, end) >= 0 or buffer.count(b"\n", 0, end) != 2 * buffer.count(b"\n\n", 0, end):
            return 0  # a carriage return, or an event of more than one line
        try:
            texts = buffer[:end].decode("utf-8").split("\n\n")
        except UnicodeDecodeError:
            return 0
        decoded = []
        for text in texts:
            if text.startswith("data: "):
                decoded.append(ServerSentEvent("message", text[6:]))
            elif text.startswith("data:"):
                decoded.append(ServerSentEvent("message", text[5:]))
            else:
                return 0
        events.extend(decoded)
        return end + 2

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
