"""The server-sent events decoder: any split of the bytes gives the same events."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.sse import MalformedStream, ServerSentEvent, SSEDecoder

STREAM = (
    b": keep-alive comment\n\n"
    b"event: message_start\ndata: {\"a\": 1}\n\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\nretry: 10\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    ServerSentEvent("message_start", '{"a": 1}'),
    ServerSentEvent("message", "line one\nline two"),
    ServerSentEvent("message", "no-space"),
    ServerSentEvent("message", "[DONE]"),
]


def test_whole_stream():
    assert SSEDecoder().feed(STREAM) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split(cuts):
    decoder = SSEDecoder()
    events = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in zip(bounds, bounds[1:]):
        events.extend(decoder.feed(STREAM[start:end]))
    assert events == EXPECTED
    assert not decoder.pending


def test_an_unfinished_event_is_pending_not_returned():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: half") == []
    assert decoder.pending


def test_limits_and_encoding():
    with pytest.raises(MalformedStream):
        SSEDecoder(max_event_bytes=10).feed(b"data: " + b"x" * 50)
    with pytest.raises(MalformedStream):
        SSEDecoder(max_event_bytes=10).feed(b"data: 12345\n" * 5)
    with pytest.raises(MalformedStream):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")
