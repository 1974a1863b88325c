"""Starting the gateway for tests: in-process over the mock's transport, or on a real socket."""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import attrs
import httpx
import trio

from mock_server.faults import FaultProfile, decide
from orchestrator.config import Config, RetryPolicy
from orchestrator.server import serve_gateway

#: The seed's request body, byte for byte as its curl commands send it.
SEED_BODY = b'{"model":"gpt-4","messages":[{"role":"user","content":"test"}]}'
SEED_BODY_MULTILINE = b'{\n  "model":"gpt-4",\n  "messages":[{"role":"user","content":"test"}]\n}'
CURL_FORM = {"content-type": "application/x-www-form-urlencoded"}


def demo_config(mock_url: str = "http://127.0.0.1:8001", *, backoff: float | None = None, **changes: Any) -> Config:
    """The built-in demo configuration at ``mock_url``; ``backoff`` shortens the waits
    (configuration only: the logic is the same as with the default 2 s)."""
    config = Config.default(mock_url=mock_url)
    if backoff is not None:
        changes["retry"] = RetryPolicy(backoff_base=backoff, backoff_max=backoff * 8)
    return attrs.evolve(config, **changes)


def seed_giving(profile: dict[str, Any], outcomes: list[str | None], *, streaming: bool = False) -> int:
    """A mock seed under which ``profile`` gives these faults in order (None: healthy)."""
    fault_profile = FaultProfile(**profile)
    for seed in range(10_000):
        rng = random.Random(seed)
        drawn = [decide(fault_profile, rng, streaming=streaming).fault for _ in outcomes]
        if [fault.value if fault else None for fault in drawn] == outcomes:
            return seed
    raise AssertionError("no seed gives that sequence")


async def wait_until_serving(client: httpx.AsyncClient, url: str, *, within: float = 10) -> None:
    """Poll ``url``'s /health until a server answers (a process still starting refuses)."""
    with trio.fail_after(within):
        while True:
            try:
                await client.get(f"{url}/health")
                return
            except httpx.ConnectError:
                await trio.sleep(0.05)


async def start_gateway(nursery: trio.Nursery, config: Config, **options: Any) -> str:
    """Serve the gateway on 127.0.0.1, a free port; return its base URL."""
    [url] = await nursery.start(partial(serve_gateway, config, port=0, handle_signals=False, **options))
    return url
