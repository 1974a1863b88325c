"""The mock's stream events: rendered once per series, identical to rendering each whole."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mock_server import wire
from mock_server.anthropic_wire import ANTHROPIC
from mock_server.conversation import ChatRequest, Completion, Finish
from mock_server.openai_wire import OPENAI
from mock_server.wire import sse, sse_event, sse_series

# Any text, with what JSON escapes (quotes, backslashes, control characters, lone
# surrogates are excluded by orjson itself) well represented.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('"\\\n\t\x00\x1f/'))


def delta(model: str):
    return lambda text: {"model": model, "choices": [{"delta": {"content": text}, "finish_reason": None}]}


@given(model=texts, values=st.lists(texts, max_size=5))
def test_a_series_is_each_event_rendered_whole(model, values):
    data_for = delta(model)
    assert sse_series(data_for, values) == tuple(sse(data_for(value)) for value in values)
    assert sse_series(data_for, values, event="content_block_delta") == tuple(
        sse_event("content_block_delta", data_for(value)) for value in values
    )


def test_a_model_name_holding_the_placeholder_still_renders_exactly():
    values = ["Hello", " there", wire._SLOT]
    for model in (wire._SLOT, "a" + wire._SLOT + "b"):
        data_for = delta(model)
        assert sse_series(data_for, values) == tuple(sse(data_for(value)) for value in values)


@given(model=texts, pieces=st.lists(texts, min_size=1, max_size=5))
def test_each_personality_streams_its_pieces_as_whole_events(model, pieces):
    request = ChatRequest(model=model, prompt="p", prefill=None, prompt_tokens=1, max_tokens=None, stream=True)
    completion = Completion(tuple(pieces), Finish.STOP, 1)
    openai = OPENAI.stream_script(request, completion, "chatcmpl-1")
    created = openai.head.split(b'"created":')[1].split(b",")[0].decode()
    assert openai.pieces == tuple(
        sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": int(created), "model": model,
             "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}]})
        for piece in pieces
    )
    anthropic = ANTHROPIC.stream_script(request, completion, "msg_1")
    assert anthropic.pieces == tuple(
        sse_event("content_block_delta",
                  {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
        for piece in pieces
    )
