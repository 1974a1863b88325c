"""The client's side of a committed stream: chunks in order, and an honest ending.

A :class:`ChunkStream` exists only once a stream has reached its commit point
(the first content chunk): from then on the answer belongs to the client, and the
router never starts a second answer on it. If the upstream breaks after commit,
the stream is continued from the text already delivered on a deployment that
accepts an assistant prefill (the same one first, when it does); otherwise, or if
that fails too, iteration raises :class:`~orchestrator.errors.StreamInterrupted`
carrying the original failure, so a truncated answer never looks complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from orchestrator.config import Deployment
from orchestrator.errors import GatewayError, StreamInterrupted
from orchestrator.logs import event
from orchestrator.messages import ChunkSource, ErrorClass, StreamBroken, StreamEnd, StreamItem

if TYPE_CHECKING:
    from orchestrator.router import Journey, Opened, Router
    from orchestrator.validation import ChatRequest

__all__ = ["ChunkStream"]


class ChunkStream:
    """An async iterator of OpenAI ``chat.completion.chunk`` dicts.

    Blocks only while waiting for the provider's next chunk (each wait bounded by
    the provider's idle timeout and the request's deadline). :meth:`close` is
    synchronous and safe to call from a ``finally`` during cancellation: it cancels
    the upstream call at once. Iterate it from one task. A read cancelled while it
    waits for the provider gives up the upstream call (its place in the response is
    lost): reading on continues the answer as after a break, or raises
    :class:`~orchestrator.errors.StreamInterrupted`.

    ``provider`` and ``model`` name who is answering; ``usage`` is the usage of
    what the client received, once the stream has ``finished``.
    """

    def __init__(self, *, router: Router, request: ChatRequest, journey: Journey, opened: Opened) -> None:
        self._router = router
        self._request = request
        self._journey = journey
        self._deployment = opened.deployment
        self._scope = opened.scope
        stream = opened.outcome
        # Chunks before the commit point, a few at most: a list (a deque's first block
        # alone is about 600 bytes, held by every stream).
        self._head: list[dict[str, Any]] = list(stream.head)  # type: ignore[union-attr]
        self._chunks: ChunkSource = stream.chunks  # type: ignore[union-attr]
        first = self._head[0] if self._head else {}
        self.id: str = first.get("id") or f"chatcmpl-{journey.request_id}"
        self.created: int = first.get("created") or int(time.time())
        self.model: str = first.get("model") or journey.model or request.model
        self.provider: str = opened.deployment.provider
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.continuations = 0
        self._text: list[str] = []
        self._content_chunks = 0
        self._prefix_chunks = 0
        self._tool_calls_seen = False
        self._done = False
        #: Whether the provider's stream has ended cleanly (and the answer is whole).
        self.finished = False
        #: A break (StreamBroken) that ``next_batch`` took but did not handle.
        self._deferred: StreamBroken | None = None

    @property
    def request_id(self) -> str:
        return self._journey.request_id

    @property
    def network_attempts(self) -> int:
        """Upstream calls made for this answer so far (continuations included)."""
        return self._journey.network_attempts

    @property
    def text(self) -> str:
        """The content delivered so far."""
        return "".join(self._text)

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._head:
                return self._present(self._head.pop(0))
            if self._done:
                raise StopAsyncIteration
            item: StreamItem | None = self._deferred
            if item is not None:
                self._deferred = None
            else:
                try:
                    item = await self._chunks.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    item = StreamBroken(ErrorClass.TRANSIENT, "the provider's stream stopped without an end")
            if isinstance(item, dict):
                return self._present(item)
            if isinstance(item, StreamEnd):
                usage_chunk = self._finish(item)
                if usage_chunk is None:
                    raise StopAsyncIteration
                return usage_chunk
            if not await self._continue(item):
                self._done = True
                raise StreamInterrupted(
                    f"The answer was interrupted after {self._content_chunks} chunks: {item.message}",
                    attempts=tuple(self._journey.attempts),
                    request_id=self._journey.request_id,
                )

    async def next_batch(self, limit: int = 64) -> list[dict[str, Any]]:
        """The next chunk, and up to ``limit - 1`` more that are already here.

        Blocks only for the first (as ``__anext__`` does, whose exceptions it raises);
        the rest are taken without waiting, so a client that reads slower than the
        provider writes gets chunks in batches, one write each. A clean end found while
        batching ends the batch and the stream (``finished``; the usage chunk, when the
        client asked for it, comes last in the batch), so the batch can leave with the
        end of the response; a break is kept for the next call, which continues the
        answer or raises.
        """
        batch = [await self.__anext__()]
        while len(batch) < limit and not self._done:
            if self._head:
                batch.append(self._present(self._head.pop(0)))
                continue
            try:
                item = self._chunks.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(item, StreamEnd):
                usage_chunk = self._finish(item)
                if usage_chunk is not None:
                    batch.append(usage_chunk)
                break
            if not isinstance(item, dict):
                self._deferred = item
                break
            batch.append(self._present(item))
        return batch

    def close(self) -> None:
        """Abandon the stream: cancel the upstream call unless it has ended (synchronous,
        never blocks). One that ended cleanly finishes by itself, reading the rest of its
        body so that its connection can be reused."""
        self._done = True
        self._chunks.close()

    def _finish(self, end: StreamEnd) -> dict[str, Any] | None:
        """Take the provider's clean end; the usage chunk, if the client asked for one."""
        self._done = True
        self.finished = True
        self.finish_reason = end.finish_reason
        self.usage = self._usage(end.usage)
        if not (self._request.include_usage and self.usage is not None):
            return None
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage,
        }

    # -- presentation ---------------------------------------------------------------

    def _present(self, chunk: dict[str, Any]) -> dict[str, Any]:
        # One answer, one id: continuation chunks come from another upstream response.
        chunk["id"] = self.id
        for choice in chunk.get("choices", ()):
            delta = choice.get("delta")
            if delta:
                content = delta.get("content")
                if content:
                    self._text.append(content)
                    self._content_chunks += 1
                if delta.get("tool_calls") or delta.get("function_call"):
                    self._tool_calls_seen = True
        model = chunk.get("model")
        if model:
            self.model = model
        return chunk

    def _usage(self, upstream: dict[str, Any] | None) -> dict[str, Any] | None:
        """Usage of what the client received.

        After a continuation the last provider counted the delivered prefix as prompt
        (it was sent back as an assistant prefill) and only the remainder as
        completion; the prefix's chunks move back to the completion side (a streamed
        chunk is about one token), so the client is billed for one answer, not for a
        failed attempt.
        """
        if upstream is None or not self.continuations:
            return upstream
        prompt = int(upstream.get("prompt_tokens", 0))
        completion = int(upstream.get("completion_tokens", 0))
        moved = min(self._prefix_chunks, prompt)
        prompt, completion = prompt - moved, completion + moved
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- continuation -----------------------------------------------------------------

    async def _continue(self, broken: StreamBroken) -> bool:
        """Continue a broken answer from its delivered text; False when it cannot be
        (or the stream was closed meanwhile, from another task)."""
        self._scope.cancel()
        journey = self._journey
        deployments = self._prefill_deployments()
        text = self.text
        if (self._done or broken.error_class is ErrorClass.DEADLINE or not deployments or not text
                or self._tool_calls_seen):
            event(logging.WARNING, journey.request_id, "stream_broken",
                  f"stream from {self.provider} broke after {self._content_chunks} chunks: {broken.message}",
                  provider=self.provider, reason=broken.error_class.value)
            return False
        event(logging.WARNING, journey.request_id, "stream_continue",
              f"stream from {self.provider} broke after {self._content_chunks} chunks ({broken.message});"
              f" continuing on {deployments[0].provider} from the {len(text)} characters delivered",
              provider=self.provider, reason=broken.error_class.value, target=deployments[0].provider)
        messages = [*self._request.body["messages"], {"role": "assistant", "content": text}]
        try:
            opened = await self._router.run(
                self._request, journey, body={**self._request.body, "messages": messages}, deployments=deployments
            )
        except GatewayError as error:
            event(logging.WARNING, journey.request_id, "stream_continue_failed",
                  f"continuation failed ({error.message}); ending the stream with the original error")
            return False
        stream = opened.outcome
        if self._done:  # closed while the continuation was being opened
            stream.chunks.close()  # type: ignore[union-attr]
            opened.scope.cancel()
            return False
        self.continuations += 1
        self._prefix_chunks = self._content_chunks
        self._deployment = opened.deployment
        self.provider = opened.deployment.provider
        self._scope = opened.scope
        self._chunks = stream.chunks  # type: ignore[union-attr]
        # The client already has the role chunk: pass on only what carries content.
        self._head.extend(chunk for chunk in stream.head if _carries_content(chunk))  # type: ignore[union-attr]
        return True

    def _prefill_deployments(self) -> Sequence[Deployment]:
        """Deployments that may continue: this one first if it takes a prefill, then later ones."""
        route = self._router.route(self._request.model)
        deployments = list(route.deployments)
        try:
            start = deployments.index(self._deployment)
        except ValueError:
            start = 0
        return [deployment for deployment in deployments[start:] if deployment.prefill]


def _carries_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices", ()):
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("finish_reason"):
            return True
    return False
