"""What the benchmark measures: the mock alone, the gateway, and the LiteLLM peer.

All of them answer the same OpenAI chat-completions request for model ``mock`` (the
mock answers at once) or ``mock-d50`` (the mock waits 50 ms first, through its
``/d50`` path prefix), so each target reaches the very same mock endpoints:

- ``direct``: the mock itself, ``/v1/...`` or ``/d50/v1/...``;
- ``gateway-N``: ``orchestrator serve --workers N --log-level WARNING`` with one
  provider per endpoint (``bench_gateway_config``), defaults otherwise;
- ``litellm``: the LiteLLM proxy 1.108.7 from ``.peers/litellm-venv`` (``make
  bench-peers``), configured by ``LITELLM_CONFIG`` and ``LITELLM_ENV`` below: one
  worker, no retries, no database.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.procs import Server, free_port

__all__ = [
    "LITELLM_KEY",
    "REPO",
    "Target",
    "body_for",
    "gateway_counts",
    "litellm_binary",
    "model_for",
    "start_gateway",
    "start_litellm",
    "start_mock",
]

REPO = Path(__file__).resolve().parent.parent
LITELLM_KEY = "sk-bench-peer-key"
LITELLM_VERSION = "1.108.7"
#: A LiteLLM proxy with no database takes about 6 s to start; give it ten times that.
LITELLM_START_TIMEOUT = 60.0
START_TIMEOUT = 30.0

#: LiteLLM's environment: no .env, quiet, no telemetry, no remote fetches.
LITELLM_ENV = {
    "LITELLM_MODE": "PRODUCTION",
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "true",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "LITELLM_MASTER_KEY": LITELLM_KEY,
}

#: LiteLLM's model list: the mock's two endpoints, with its port filled in.
LITELLM_CONFIG = """\
model_list:
  - model_name: mock
    litellm_params:
      model: openai/mock
      api_base: {mock}/v1
      api_key: sk-fake
  - model_name: mock-d50
    litellm_params:
      model: openai/mock
      api_base: {mock}/d50/v1
      api_key: sk-fake
router_settings:
  num_retries: 0
litellm_settings:
  num_retries: 0
  request_timeout: 30
general_settings: {{}}
"""

GATEWAY_CONFIG = """\
# The benchmark's gateway: one provider per mock endpoint, defaults otherwise.
[providers.mock]
kind = "openai"
base_url = "{mock}/v1"

[providers.mock-d50]
kind = "openai"
base_url = "{mock}/d50/v1"

[[routes]]
match = "mock"
deployments = [{{ provider = "mock" }}]

[[routes]]
match = "mock-d50"
deployments = [{{ provider = "mock-d50" }}]
"""


@dataclass(frozen=True)
class Target:
    """A running target: its name, its base URL and its server (``direct``: the mock)."""

    name: str
    url: str
    server: Server
    auth: str = ""

    def path(self, latency_ms: int) -> str:
        """The chat-completions URL for a mock latency (direct: the /d<ms> prefix)."""
        if self.name == "direct" and latency_ms:
            return f"{self.url}/d{latency_ms}/v1/chat/completions"
        return f"{self.url}/v1/chat/completions"


def model_for(latency_ms: int) -> str:
    return f"mock-d{latency_ms}" if latency_ms else "mock"


def body_for(latency_ms: int, *, stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": model_for(latency_ms),
        "messages": [{"role": "user", "content": "Say something about benchmarks."}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def litellm_binary() -> Path | None:
    binary = REPO / ".peers" / "litellm-venv" / "bin" / "litellm"
    return binary if binary.exists() else None


def start_mock(workdir: Path) -> Target:
    port = free_port()
    server = Server(
        "mock",
        [sys.executable, "-m", "mock_server", "--port", str(port), "--log-level", "warning"],
        log_path=workdir / "mock.log",
    )
    target = Target("direct", f"http://127.0.0.1:{port}", server)
    server.wait_ready(lambda: _answers(target, 0) and _answers(target, 50), START_TIMEOUT)
    return target


def start_gateway(workdir: Path, mock_url: str, workers: int) -> Target:
    config = workdir / "gateway.toml"
    config.write_text(GATEWAY_CONFIG.format(mock=mock_url))
    port = free_port()
    server = Server(
        f"gateway-{workers}",
        [sys.executable, "-m", "orchestrator", "serve", "--config", str(config), "--port", str(port),
         "--workers", str(workers), "--log-level", "WARNING"],
        log_path=workdir / f"gateway-{workers}.log",
    )
    target = Target(server.name, f"http://127.0.0.1:{port}", server)
    server.wait_ready(lambda: _answers(target, 0) and _answers(target, 50), START_TIMEOUT)
    return target


def start_litellm(workdir: Path, mock_url: str, binary: Path) -> Target:
    config = workdir / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(mock=mock_url))
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(LITELLM_ENV)
    server = Server(
        "litellm",
        [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        log_path=workdir / "litellm.log",
        env=env,
    )
    target = Target("litellm", f"http://127.0.0.1:{port}", server, auth=LITELLM_KEY)
    server.wait_ready(lambda: _answers(target, 0) and _answers(target, 50), LITELLM_START_TIMEOUT)
    return target


def gateway_counts(target: Target, workers: int, patience: float = 5.0) -> dict[int, dict[str, dict[str, int]]]:
    """What each worker of a gateway says its provider actors have counted so far, from
    its ``/health``: ``{worker pid: {provider: {outcome or refusal: count}}}``, with
    ``circuit_transitions`` among the counts.

    Each worker answers for itself, and the kernel picks the worker of each new
    connection, so ``/health`` is asked on a fresh connection until every worker has
    answered: ten tries per worker at most, for ``patience`` seconds at most in all (a
    gateway still busy with the load it was just given may be slow to answer). A worker
    not reached is left out.
    """
    counts: dict[int, dict[str, dict[str, int]]] = {}
    deadline = time.monotonic() + patience
    for _ in range(10 * workers):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            health = httpx.get(f"{target.url}/health", timeout=left, trust_env=False).json()
        except (httpx.HTTPError, ValueError):
            continue
        counts[health["worker_pid"]] = {
            name: {**provider["totals"], "circuit_transitions": provider["circuit_transitions"]}
            for name, provider in health["providers"].items()
        }
        if len(counts) == workers:
            break
    return counts


def _answers(target: Target, latency_ms: int) -> bool:
    """Ready means: the benchmark's own request gets a 200 (the configuration works)."""
    headers = {"content-type": "application/json"}
    if target.auth:
        headers["authorization"] = f"Bearer {target.auth}"
    try:
        response = httpx.post(target.path(latency_ms), content=body_for(latency_ms, stream=False),
                              headers=headers, timeout=5.0, trust_env=False)
    except httpx.HTTPError:
        return False
    return response.status_code == 200
