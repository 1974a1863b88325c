"""Masking a provider's key in upstream text: where it is masked, and where it is not."""

from __future__ import annotations

import pytest

from providers.adapter import ProviderError
from providers.redact import MASK, Redactor

KEY = "sk-SECRET-CX-KEY-999"


def test_a_key_is_masked_wherever_it_occurs():
    redact = Redactor.for_key(KEY)
    assert redact.text(f"Incorrect API key provided: {KEY}.") == f"Incorrect API key provided: {MASK}."
    # Glued to other text (a header quoted without its space), and more than once.
    assert redact.text(f"Bearer{KEY} / x-api-key:{KEY}") == f"Bearer{MASK} / x-api-key:{MASK}"


def test_a_key_in_any_field_of_an_error_is_masked():
    reported = ProviderError(
        f"bad key {KEY}",
        code=KEY,
        error_type="invalid_request_error",
        status=401,
        openai_error={"message": f"bad key {KEY}", "type": "invalid_request_error",
                      "param": {"header": [f"Bearer {KEY}", 3]}, "code": KEY},
    )
    masked = Redactor.for_key(KEY).error(reported)
    assert KEY not in repr(masked)
    assert masked.openai_error["param"] == {"header": [f"Bearer {MASK}", 3]}
    assert masked.error_type == "invalid_request_error" and masked.status == 401


@pytest.mark.parametrize(("text", "masked"), [
    ("ab", MASK),
    ("key ab rejected", f"key {MASK} rejected"),
    ("'ab'.", f"'{MASK}'."),
    ("about a cab; ab-testing, ab_1, 1ab", "about a cab; ab-testing, ab_1, 1ab"),
])
def test_a_short_key_is_masked_only_as_a_whole_token(text, masked):
    assert Redactor.for_key("ab").text(text) == masked


@pytest.mark.parametrize("key", [None, ""])
def test_without_a_key_nothing_is_masked(key):
    text = "Incorrect API key provided: sk-..."
    assert Redactor.for_key(key).text(text) == text
    reported = ProviderError(text, openai_error={"message": text})
    assert Redactor.for_key(key).error(reported) is reported
