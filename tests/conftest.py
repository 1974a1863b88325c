"""Shared fixtures. Keep each component's fixtures in its own section."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio

from mock_server import MockState, create_app, open_mock_transport
from orchestrator.hosting import serve

# --- Mock provider -------------------------------------------------------------------
#
# mock_state          a fresh MockState, generators seeded with MOCK_SEED
# mock_client         httpx client on the mock in-process (no socket: MockClock-safe)
# mock_server_url     the mock on a real socket, 127.0.0.1 port 0 (never with MockClock)

MOCK_SEED = 1234


@pytest.fixture
def mock_state() -> MockState:
    return MockState.create(seed=MOCK_SEED)


@pytest.fixture
async def mock_client(mock_state: MockState) -> AsyncIterator[httpx.AsyncClient]:
    async with open_mock_transport(mock_state) as transport:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://mock", timeout=None
        ) as client:
            yield client


@pytest.fixture
async def mock_server_url(mock_state: MockState, nursery: trio.Nursery) -> str:
    [url] = await nursery.start(partial(serve, create_app(mock_state)))
    return url
