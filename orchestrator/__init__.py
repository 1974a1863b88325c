"""A resilient OpenAI-compatible LLM gateway on trio.

The embedding API::

    async with open_orchestrator(Config.default()) as gw:
        completion = await gw.chat_completion({"model": "gpt-4", "messages": [...]})
"""

from orchestrator import errors
from orchestrator.config import Config, ConfigError
from orchestrator.service import Completion, Orchestrator, open_orchestrator
from orchestrator.streaming import ChunkStream

__all__ = ["ChunkStream", "Completion", "Config", "ConfigError", "Orchestrator", "errors", "open_orchestrator"]
