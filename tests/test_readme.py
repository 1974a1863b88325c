"""The README's examples run as written."""

from __future__ import annotations

import pathlib
import re
import tomllib

from orchestrator.config import Config

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


async def test_the_embedding_example_runs(mock_server_url, capsys):
    [example] = [block for block in code_blocks("python") if "open_orchestrator" in block]
    assert "Config.default()" in example
    # Point it at the test's mock instead of 127.0.0.1:8001, and run its main() here.
    source = example.replace("Config.default()", f"Config.default(mock_url={mock_server_url!r})")
    source = source.replace("trio.run(main)", "")
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    await namespace["main"]()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("openai ")
    assert printed[-1].startswith("400 messages ")


def test_the_configuration_example_is_valid():
    [example] = [block for block in code_blocks("toml") if "[[routes]]" in block]
    config = Config.from_mapping(tomllib.loads(example.replace('["sk-gw-..."]', '["sk-gw-0123456789"]')))
    assert config.route_for("gpt-4").deployments[1].prefill is True
    assert config.provider("openai").timeouts.idle == 30
