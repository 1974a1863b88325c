"""Upstream HTTP clients for one provider: a few small httpx pools, made once.

httpx's connection pool does bookkeeping over every pooled connection on each
request, so one big pool with hundreds of slow calls in flight spends much of its
time there. Several smaller pools (shards), used in turn and sharing one SSL
context, keep that work small. Transport-level retries are 0: the router is the
only retry loop. Read timeouts are left to the actor's trio cancel scopes; only
the connect phase has an httpx timeout.
"""

from __future__ import annotations

import ssl
from itertools import cycle

import httpx
import trio

__all__ = ["ClientPool"]

_shared_ssl_context: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _shared_ssl_context
    if _shared_ssl_context is None:
        _shared_ssl_context = ssl.create_default_context()
    return _shared_ssl_context


class ClientPool:
    """``shards`` httpx clients for one provider; :meth:`next` picks one, round robin.

    ``max_connections`` is shared out between the shards so the provider's concurrency
    limit, not the pool, is what refuses excess work. ``transport`` replaces the
    network (tests serve the mock app in-process); one transport then serves all shards.
    """

    def __init__(
        self,
        *,
        shards: int,
        max_connections: int,
        connect_timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        per_shard = max(1, -(-max_connections // shards))
        timeout = httpx.Timeout(None, connect=connect_timeout)
        self._clients: list[httpx.AsyncClient] = []
        for _ in range(shards):
            if transport is None:
                shard_transport: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
                    verify=_ssl_context(),
                    retries=0,
                    limits=httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard),
                )
            else:
                shard_transport = transport
            self._clients.append(httpx.AsyncClient(transport=shard_transport, timeout=timeout, trust_env=False))
        self._owns_transports = transport is None
        self._next = cycle(self._clients).__next__

    def next(self) -> httpx.AsyncClient:
        return self._next()

    async def aclose(self) -> None:
        """Close every shard's connections (shielded: this runs during cancellation).

        An injected transport belongs to whoever injected it and is left open.
        """
        if not self._owns_transports:
            return
        with trio.CancelScope(shield=True):
            for client in self._clients:
                await client.aclose()
