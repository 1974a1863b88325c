"""A raw HTTP/1.1 server on 127.0.0.1 for upstream tests: it answers with the exact bytes a
test chose, counts connections and records what it received."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

Answer = Callable[[trio.SocketStream, bytes], Awaitable[None]]


class Server:
    """Accepts connections; per request, reads the head and body, then runs ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.open_connections = 0
        self.most_open = 0
        self.received: list[bytes] = []
        self.url = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_connections += 1
        self.most_open = max(self.most_open, self.open_connections)
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some()
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive_some()
                request, buffer = head + b"\r\n\r\n" + buffer[:length], buffer[length:]
                self.received.append(request)
                await self.answer(stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.open_connections -= 1


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[Server]:
    server = Server(answer)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        yield server
        nursery.cancel_scope.cancel()


def reply(*pieces: bytes, close: bool = False) -> Answer:
    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        for piece in pieces:
            await stream.send_all(piece)
        if close:
            await stream.aclose()

    return answer
