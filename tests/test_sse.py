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


_TEXT = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)
_EVENT = st.one_of(
    _TEXT.map(lambda text: b"data: " + text.encode() + b"\n\n"),  # what OpenAI sends
    _TEXT.map(lambda text: b"data:" + text.encode() + b"\n\n"),
    st.tuples(_TEXT, _TEXT).map(lambda pair: b"event: %b\ndata: %b\n\n" % (pair[0].encode(), pair[1].encode())),
    st.lists(_TEXT, min_size=1, max_size=3).map(lambda lines: b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"),
    _TEXT.map(lambda text: b"data: " + text.encode() + b"\r\n\r\n"),
    _TEXT.map(lambda text: b": " + text.encode() + b"\n\n"),
    st.just(b"\n"),
    st.just(b"data: \xff\n\n"),  # not UTF-8: malformed, however it is fed
)


def _decode(pieces: list[bytes]) -> list[ServerSentEvent] | type[MalformedStream]:
    decoder = SSEDecoder()
    events = []
    try:
        for piece in pieces:
            events.extend(decoder.feed(piece))
    except MalformedStream:
        return MalformedStream
    return events


@given(st.lists(_EVENT, max_size=8), st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_whole_events_decode_as_line_by_line(events, cuts):
    """Fed whole events at once, the decoder takes one-line data events in one step;
    fed byte by byte, it decodes every line as it ends: both give the same events."""
    stream = b"".join(events)
    one_by_one = _decode([stream[i:i + 1] for i in range(len(stream))])
    assert _decode([stream]) == one_by_one
    bounds = [0, *sorted(min(cut, len(stream)) for cut in cuts), len(stream)]
    assert _decode([stream[start:end] for start, end in zip(bounds, bounds[1:])]) == one_by_one


def test_the_size_limit_is_per_event_whatever_the_buffer_holds():
    small = b"data: x\n\n" * 20  # 180 bytes of events of 7 bytes each
    assert SSEDecoder(max_event_bytes=50).feed(small) == [ServerSentEvent("message", "x")] * 20
    with pytest.raises(MalformedStream):
        SSEDecoder(max_event_bytes=50).feed(b"data: x\n\n" + b"data: " + b"y" * 60 + b"\n\n")
