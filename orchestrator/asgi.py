"""What the plain ASGI handlers mounted in front of quart-trio apps share.

The gateway's ``/v1/chat/completions`` (:mod:`orchestrator.completions`) and the mock
provider's model endpoints are the hot paths of their servers, and skip quart's
per-request machinery. They share reading a body within limits, being cancelled when
the client disconnects, and the shape of response messages.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, HTTPScope

from orchestrator.appqueue import AppQueue
from orchestrator.errors import BodyTimeout, BodyTooLarge
from orchestrator.hosting import DISCONNECT_EXTENSION

__all__ = ["Message", "body_message", "read_body", "request_headers", "start_message", "until_disconnect"]

Message = dict[str, Any]


def request_headers(scope: HTTPScope) -> dict[bytes, str]:
    """The request's headers by lower-case name (the last of repeated ones)."""
    return {name: value.decode("latin-1") for name, value in scope["headers"]}


async def read_body(
    receive: ASGIReceiveCallable, declared: str | None, *, limit: int | None, timeout: float | None
) -> bytes | None:
    """The whole request body, or None if the client disconnected first.

    Raises :class:`BodyTooLarge` as soon as the body is known to exceed ``limit``
    bytes (a declared ``Content-Length`` before any of it is read), and
    :class:`BodyTimeout` if it has not all arrived within ``timeout`` seconds.
    ``declared`` is the ``Content-Length`` header, which the server has checked.
    """
    if limit is not None and declared is not None and int(declared) > limit:
        raise _too_large(limit)
    message = _already_received(receive)
    if message is not None and message["type"] == "http.request" and not message.get("more_body", False):
        # The whole body, here before we asked (nearly always, with orchestrator.http1):
        # no timeout to set, no cancel scope to enter.
        body = message.get("body", b"")
        if limit is not None and len(body) > limit:
            raise _too_large(limit)
        return body
    pieces: list[bytes] = []
    size = 0
    with trio.move_on_after(math.inf if timeout is None else timeout):
        while True:
            if message is None:
                message = await receive()
            if message["type"] == "http.disconnect":
                return None
            piece = message.get("body", b"")
            size += len(piece)
            if limit is not None and size > limit:
                raise _too_large(limit)
            pieces.append(piece)
            if not message.get("more_body", False):
                return b"".join(pieces)
            message = None
    raise BodyTimeout(f"The request body did not arrive within {timeout:g} s.")


def _already_received(receive: ASGIReceiveCallable) -> Message | None:
    """The message ``receive`` would return at once, if there is one and ``receive`` can
    tell without waiting (an ``AppQueue``'s, or hypercorn's trio memory channel's);
    else None."""
    queue = getattr(receive, "__self__", None)
    if not isinstance(queue, AppQueue | trio.MemoryReceiveChannel):
        return None
    try:
        return queue.receive_nowait()
    except trio.WouldBlock:
        return None


def until_disconnect(
    scope: HTTPScope, receive: ASGIReceiveCallable, answer: Callable[[trio.CancelScope], Awaitable[None]]
) -> Awaitable[None]:
    """Run ``answer(cancel_scope)`` when awaited, where ``cancel_scope`` is cancelled if
    the client disconnects; ``answer`` enters it around what the client's leaving should
    stop.

    Call it once the body has been read, and await what it returns at once. Served by
    :mod:`orchestrator.hosting`, the connection cancels the scope itself
    (``DISCONNECT_EXTENSION``) and this returns ``answer``'s own coroutine: a request in
    flight holds no frame of this function. Under another ASGI server a task waits for
    ``http.disconnect``.
    """
    cancel_scope = trio.CancelScope()
    cancel_on_disconnect = scope["extensions"].get(DISCONNECT_EXTENSION)
    if cancel_on_disconnect is not None:
        cancel_on_disconnect(cancel_scope)
        return answer(cancel_scope)
    return _answer_watching_for_disconnect(receive, answer, cancel_scope)


async def _answer_watching_for_disconnect(
    receive: ASGIReceiveCallable, answer: Callable[[trio.CancelScope], Awaitable[None]], cancel_scope: trio.CancelScope
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, cancel_scope)
        await answer(cancel_scope)
        nursery.cancel_scope.cancel()


def start_message(status: int, content_type: bytes, headers: dict[str, str], *, length: int | None = None) -> Message:
    """``http.response.start`` with a content type, ``headers`` and, given, a length."""
    raw = [(b"content-type", content_type)]
    raw += [(name.encode(), value.encode()) for name, value in headers.items()]
    if length is not None:
        raw.append((b"content-length", b"%d" % length))
    return {"type": "http.response.start", "status": status, "headers": raw}


def body_message(content: bytes, *, more: bool = False) -> Message:
    """``http.response.body``; the last one unless ``more``."""
    return {"type": "http.response.body", "body": content, "more_body": more}


async def _cancel_on_disconnect(receive: ASGIReceiveCallable, cancel_scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel_scope.cancel()


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body is larger than the {limit} bytes accepted here.")
