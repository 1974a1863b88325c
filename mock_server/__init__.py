"""A fake OpenAI and Anthropic API that breaks on command.

``create_app(state)`` builds the quart-trio app; ``MockState`` holds the fault profiles
and statistics a test can inspect; ``open_mock_transport(state)`` serves the app
in-process to an httpx client. ``mock-provider`` (``mock_server.cli``) serves it on
127.0.0.1:8001.
"""

from .app import FAULT_HEADER, create_app
from .conversation import count_tokens, reply_for
from .faults import FaultKind, FaultProfile
from .inprocess import open_mock_transport
from .state import MockState

__all__ = [
    "FAULT_HEADER",
    "FaultKind",
    "FaultProfile",
    "MockState",
    "count_tokens",
    "create_app",
    "open_mock_transport",
    "reply_for",
]
