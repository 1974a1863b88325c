"""Masking a provider's own API key in the text that provider sends back.

Upstreams echo the key they were sent: a 401 says "Incorrect API key provided:
sk-...", a 400 may quote the request's ``Authorization`` header. That text becomes
the client's error (passed through, or the detail of a 502), stream interruptions
and the gateway's log lines, and keys must never appear in logs, responses or
``/health``. The provider's actor knows its own key and is where every upstream
error enters the gateway, so it masks the key there, once, before anything else
sees the text.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from providers.adapter import ProviderError

__all__ = ["MASK", "MIN_SUBSTRING_KEY", "Redactor"]

#: What stands in for the key. Nothing of the key is kept (not even OpenAI's last
#: four characters): the provider's name, which every log line and attempt carries,
#: already says which key it was (one key per provider), and four characters would
#: be most of a short key.
MASK = "[redacted]"

#: Keys at least this long are masked wherever they occur, even inside a longer
#: word (``Bearersk-...``): a string that long is the key, not a coincidence.
#: Shorter ones (``ollama``, ``EMPTY``: placeholders that local servers accept) are
#: masked only as a whole token, so that a key ``ab`` does not eat every "ab" of
#: "about" and make the message unreadable.
MIN_SUBSTRING_KEY = 8

#: What may not touch a short key on either side for it to count as a token.
_TOKEN_CHARACTER = r"[\w-]"


@attrs.frozen
class Redactor:
    """Masks one provider's key in upstream text; does nothing for a provider without one."""

    _pattern: re.Pattern[str] | None = attrs.field(repr=False)

    @classmethod
    def for_key(cls, key: str | None) -> Redactor:
        # An empty key is sent to no one (the adapters send none), and an empty
        # pattern would match between every two characters.
        if not key:
            return cls(None)
        escaped = re.escape(key)
        if len(key) < MIN_SUBSTRING_KEY:
            escaped = f"(?<!{_TOKEN_CHARACTER}){escaped}(?!{_TOKEN_CHARACTER})"
        return cls(re.compile(escaped))

    def text(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced by :data:`MASK`."""
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

    def value(self, value: Any) -> Any:
        """A JSON value from upstream with the key masked in every string in it.

        The whole value, not only the message: an error's ``param``, ``code`` or any
        field a compatible server adds is copied to the client as it came.
        """
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(key) if isinstance(key, str) else key: self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def error(self, error: ProviderError) -> ProviderError:
        """``error`` with the key masked in everything that came from the provider."""
        if self._pattern is None:
            return error
        return attrs.evolve(
            error,
            message=self.text(error.message),
            code=self.value(error.code),
            error_type=self.value(error.error_type),
            openai_error=self.value(error.openai_error),
        )
