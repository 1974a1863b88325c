"""Configuration: the built-in demo set-up, TOML files, and errors that name the key."""

from __future__ import annotations

import pytest

from orchestrator.config import Config, ConfigError, Deployment

MINIMAL = {
    "providers": {"openai": {"kind": "openai", "base_url": "http://127.0.0.1:8001/v1"}},
    "routes": [{"match": "gpt-*", "deployments": [{"provider": "openai"}]}],
}


def test_default_serves_the_seed_demo():
    config = Config.default()
    assert [p.name for p in config.providers] == ["openai", "anthropic"]
    assert config.provider("openai").kind == "openai"
    assert config.provider("openai").base_url == "http://127.0.0.1:8001/v1"
    assert config.provider("anthropic").kind == "anthropic"
    assert config.provider("anthropic").base_url == "http://127.0.0.1:8001"
    route = config.route_for("gpt-4")
    assert [d.provider for d in route.deployments] == ["openai", "anthropic"]
    assert route.deployments[0].upstream_model("gpt-4") == "gpt-4"
    assert route.deployments[1].upstream_model("gpt-4").startswith("claude-")
    assert config.route_for("gpt-4o-mini") is route
    assert config.route_for("llama") is None
    assert config.retry.max_attempts == 3 and config.retry.backoff_base == 2.0
    assert config.provider("openai").breaker.failure_threshold == 5


def test_exact_routes_win_over_globs_whatever_their_order():
    config = Config.from_mapping({
        **MINIMAL,
        "providers": {**MINIMAL["providers"], "backup": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "routes": [
            {"match": "gpt-*", "deployments": [{"provider": "openai"}]},
            {"match": "gpt-4", "deployments": [{"provider": "backup", "model": "other"}]},
        ],
    })
    assert config.route_for("gpt-4").deployments == (Deployment("backup", "other"),)
    assert config.route_for("gpt-5").deployments == (Deployment("openai"),)


def test_two_providers_may_share_a_base_url():
    config = Config.from_mapping({
        "providers": {
            "a": {"kind": "openai", "base_url": "http://127.0.0.1:8001/v1"},
            "b": {"kind": "openai", "base_url": "http://127.0.0.1:8001/v1"},
        },
        "routes": [{"match": "m", "deployments": [{"provider": "a"}, {"provider": "b"}]}],
    })
    assert len(config.providers) == 2


def test_toml_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
deadline_seconds = 12
seed = 3
send_timeout_seconds = 7.5
[retry]
max_attempts = 2
backoff_base_seconds = 0.5
[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:8001/v1/"
api_key = "sk-secret-value"
attempt_timeout_seconds = 4
[providers.openai.breaker]
failure_threshold = 3
open_seconds = 5
[[routes]]
match = "gpt-4"
deployments = [{ provider = "openai", model = "gpt-4o", prefill = true }]
retry = { max_attempts = 1 }
"""
    )
    config = Config.from_toml(path)
    openai = config.provider("openai")
    assert config.deadline == 12 and config.seed == 3 and config.send_timeout == 7.5
    assert config.retry.max_attempts == 2 and config.retry.backoff_base == 0.5
    assert openai.base_url == "http://127.0.0.1:8001/v1"
    assert openai.timeouts.attempt == 4
    assert openai.breaker.failure_threshold == 3 and openai.breaker.open_interval == 5
    route = config.route_for("gpt-4")
    assert route.deployments == (Deployment("openai", "gpt-4o", prefill=True),)
    assert config.retry_for(route).max_attempts == 1
    assert "sk-secret-value" not in repr(config)


def test_api_keys_come_from_the_environment_when_not_configured():
    config = Config.from_mapping(MINIMAL, environ={"OPENAI_API_KEY": "sk-from-env"})
    assert config.provider("openai").api_key == "sk-from-env"
    custom = Config.from_mapping(
        {**MINIMAL, "providers": {"openai": {**MINIMAL["providers"]["openai"], "api_key_env": "MY_KEY"}}},
        environ={"MY_KEY": "sk-mine", "OPENAI_API_KEY": "sk-other"},
    )
    assert custom.provider("openai").api_key == "sk-mine"


def test_client_keys_from_the_environment():
    config = Config.from_mapping(MINIMAL, environ={"ORCHESTRATOR_CLIENT_KEYS": "key-one-123, key-two-456"})
    assert config.client_keys == ("key-one-123", "key-two-456")


@pytest.mark.parametrize(
    "change, key",
    [
        ({"deadline_seconds": "soon"}, "deadline_seconds"),
        ({"deadline_seconds": -1}, "deadline_seconds"),
        ({"deadline_seconds": True}, "deadline_seconds"),
        ({"send_timeout_seconds": 0}, "send_timeout_seconds"),
        ({"colour": "blue"}, "colour"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"retry": {"jitter": 2}}, "retry.jitter"),
        ({"retry": {"retries": 2}}, "retry.retries"),
        ({"providers": {}}, "providers"),
        ({"providers": {"openai": {"kind": "azure", "base_url": "http://x"}}}, "providers.openai.kind"),
        ({"providers": {"openai": {"kind": "openai"}}}, "providers.openai.base_url"),
        ({"providers": {"openai": {"kind": "openai", "base_url": "ftp://x"}}}, "providers.openai.base_url"),
        ({"providers": {"openai": {"kind": "openai", "base_url": "http://x", "max_concurrency": 0}}},
         "providers.openai.max_concurrency"),
        ({"providers": {"openai": {"kind": "openai", "base_url": "http://x", "timeout": 3}}},
         "providers.openai.timeout"),
        ({"providers": {"openai": {"kind": "openai", "base_url": "http://x", "breaker": {"open_seconds": 0}}}},
         "providers.openai.breaker.open_seconds"),
        ({"routes": []}, "routes"),
        ({"routes": [{"match": "x", "deployments": []}]}, "routes[0].deployments"),
        ({"routes": [{"match": "x", "deployments": [{"provider": "nobody"}]}]}, "routes[0].deployments[0].provider"),
        ({"routes": [{"deployments": [{"provider": "openai"}]}]}, "routes[0].match"),
        ({"client_keys": ["short"]}, "client_keys"),
    ],
)
def test_invalid_configuration_names_the_key(change, key):
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({**MINIMAL, **change})
    assert str(caught.value).startswith(key), str(caught.value)


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("deadline_seconds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(bad)
