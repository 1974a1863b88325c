"""A resilient OpenAI-compatible LLM gateway on trio.

The embedding API::

    from orchestrator import Config, errors, open_orchestrator

    async with open_orchestrator(Config.default()) as gw:
        completion = await gw.chat_completion({"model": "gpt-4", "messages": [...]})

The names below are imported on first use, so that importing a lower layer (say
``providers.actor``, which needs ``orchestrator.config``) does not drag the whole
service in first.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ChunkStream", "Completion", "Config", "ConfigError", "Orchestrator", "errors", "open_orchestrator"]

_LOCATIONS = {
    "ChunkStream": "orchestrator.streaming",
    "Completion": "orchestrator.service",
    "Config": "orchestrator.config",
    "ConfigError": "orchestrator.config",
    "Orchestrator": "orchestrator.service",
    "open_orchestrator": "orchestrator.service",
}


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("orchestrator.errors")
    if name in _LOCATIONS:
        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
