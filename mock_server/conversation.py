"""The mock's "model": deterministic replies, a tokenizer, and assistant prefill.

Both personalities answer through this module, so the same conversation gets the same
reply from OpenAI's and Anthropic's endpoints whatever the model name -- which is what
lets a gateway continue an answer broken on one provider with a prefill on another.

- A token is a run of non-space characters with the whitespace before it
  (``tokens("Hello there.") == ["Hello", " there."]``); ``count_tokens`` agrees with it,
  and each streamed content chunk is one token.
- The reply is a function of the text of the last user message alone (not of the model,
  the system prompt, or the personality): 12 to 27 words drawn from a fixed vocabulary
  by a hash of that text.
- Assistant prefill: when the conversation ends with an assistant message whose text is
  a prefix of the full reply, only the remainder is generated. A prefill that is not a
  prefix is ignored (the reply is the full one).
- ``max_tokens`` keeps the first tokens of the remainder and finishes with ``LENGTH``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re

import attrs

__all__ = ["ChatRequest", "Completion", "Finish", "complete", "count_tokens", "reply_for", "tokens"]

_VOCABULARY = (
    "the", "mock", "provider", "answers", "every", "request", "with", "a", "steady",
    "stream", "of", "plain", "words", "so", "that", "tests", "can", "count", "them",
    "gateway", "retries", "fails", "over", "and", "keeps", "its", "promise", "to", "clients",
    "while", "circuits", "open", "close", "again", "after", "quiet", "moments", "tokens",
    "arrive", "one", "by", "in", "order", "deadline", "budget", "holds", "firm", "under",
    "load", "latency", "stays", "low", "when", "nothing", "breaks", "today", "model",
    "replies", "calmly", "without", "surprises", "each", "time", "it", "is", "asked",
)  # fmt: skip

_TOKEN = re.compile(r"\s*\S+")


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"


@attrs.frozen
class ChatRequest:
    """A chat request as both personalities understand it, already validated."""

    model: str
    #: Text of the last user message: the reply is a function of it alone.
    prompt: str
    #: Text of a trailing assistant message, None when the last message is not one.
    prefill: str | None
    prompt_tokens: int
    max_tokens: int | None
    stream: bool
    include_usage: bool = False


@attrs.frozen
class Completion:
    """What the mock model generated: one piece of text per token."""

    pieces: tuple[str, ...]
    finish: Finish
    prompt_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def tokens(text: str) -> list[str]:
    """Split text into tokens, each carrying the whitespace before it."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    return len(text.split())


def reply_for(prompt: str) -> str:
    """The full reply to a conversation whose last user message is ``prompt``."""
    digest = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=32).digest()
    count = 12 + digest[0] % 16
    words = [_VOCABULARY[byte % len(_VOCABULARY)] for byte in digest[1 : 1 + count]]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def complete(request: ChatRequest) -> Completion:
    """Generate the completion for ``request`` (see the module docstring)."""
    if len(request.prompt) <= _REMEMBERED_PROMPT:
        pieces = _remainder(request.prompt, request.prefill)
    else:
        pieces = _remainder.__wrapped__(request.prompt, request.prefill)
    finish = Finish.STOP
    if request.max_tokens is not None and len(pieces) > request.max_tokens:
        pieces = pieces[: request.max_tokens]
        finish = Finish.LENGTH
    return Completion(pieces, finish, request.prompt_tokens)


#: Longest prompt whose reply is remembered: 256 of them are 1 MiB at most.
_REMEMBERED_PROMPT = 4096


# A benchmark asks the same question thousands of times a second, and hashing and
# tokenizing it again each time was a tenth of the mock's CPU per answer: CPU it takes
# from the gateway it shares the machine with.
@functools.lru_cache(maxsize=256)
def _remainder(prompt: str, prefill: str | None) -> tuple[str, ...]:
    """The tokens of the reply to ``prompt`` that follow ``prefill``, when it is a prefix."""
    reply = reply_for(prompt)
    if prefill is not None and reply.startswith(prefill):
        reply = reply[len(prefill) :]
    return tuple(tokens(reply))
