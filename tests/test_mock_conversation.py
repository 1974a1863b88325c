"""The mock's model: deterministic replies, token counts, max_tokens and prefill."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mock_server.conversation import ChatRequest, Finish, complete, count_tokens, reply_for, tokens


def chat(
    prompt: str = "test", *, prefill: str | None = None, max_tokens: int | None = None
) -> ChatRequest:
    return ChatRequest(
        model="gpt-4",
        prompt=prompt,
        prefill=prefill,
        prompt_tokens=count_tokens(prompt),
        max_tokens=max_tokens,
        stream=False,
    )


def test_reply_is_a_pure_function_of_the_prompt():
    assert reply_for("test") == reply_for("test")
    assert reply_for("test") != reply_for("test!")
    # Fixed across processes and versions of Python: no hash() randomisation.
    assert reply_for("test") == (
        "A close breaks one mock clients deadline plain circuits model that order firm count."
    )


@given(st.text())
def test_replies_are_12_to_27_words(prompt):
    assert 12 <= count_tokens(reply_for(prompt)) <= 27


@given(st.text())
def test_tokens_rebuild_the_text_and_agree_with_the_count(text):
    pieces = tokens(text)
    assert len(pieces) == count_tokens(text)
    assert "".join(pieces) == text.rstrip() or not text.strip()


def test_completion_usage_agrees_with_the_text():
    completion = complete(chat("hello there"))
    assert completion.text == reply_for("hello there")
    assert completion.completion_tokens == count_tokens(completion.text)
    assert completion.prompt_tokens == 2
    assert completion.finish is Finish.STOP


def test_max_tokens_truncates_with_length():
    completion = complete(chat(max_tokens=3))
    assert completion.pieces == ("A", " close", " breaks")
    assert completion.finish is Finish.LENGTH
    exact = complete(chat(max_tokens=count_tokens(reply_for("test"))))
    assert exact.finish is Finish.STOP


@given(st.text(), st.integers(min_value=0, max_value=120))
def test_prefill_of_any_prefix_continues_exactly(prompt, cut):
    reply = reply_for(prompt)
    prefill = reply[:cut]
    completion = complete(chat(prompt, prefill=prefill))
    assert prefill + completion.text == reply
    assert completion.finish is Finish.STOP


def test_prefill_that_is_not_a_prefix_is_ignored():
    completion = complete(chat(prefill="Something else entirely"))
    assert completion.text == reply_for("test")


def test_max_tokens_counts_the_continuation_only():
    completion = complete(chat(prefill="A close", max_tokens=2))
    assert completion.pieces == (" breaks", " one")
    assert completion.finish is Finish.LENGTH
