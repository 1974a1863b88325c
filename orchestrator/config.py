"""Gateway configuration: frozen values, read from TOML or built in.

The built-in default serves the seed's demo out of the box: provider ``openai``
(OpenAI wire format) and provider ``anthropic`` (Anthropic wire format), both at
the mock provider on 127.0.0.1:8001, and ``gpt-*`` models routed to openai first
and to a Claude model on anthropic second.

A configuration file is TOML::

    deadline_seconds = 60          # one budget per request, all attempts and waits
    seed = 7                       # optional: makes backoff jitter reproducible

    [retry]                        # global retry policy; a route may override it
    max_attempts = 3
    backoff_base_seconds = 2.0

    [providers.openai]
    kind = "openai"
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"

    [[routes]]
    match = "gpt-*"                # exact name or glob
    deployments = [
      { provider = "openai" },     # upstream model defaults to the requested one
      { provider = "anthropic", model = "claude-sonnet-4-5", prefill = true },
    ]

Every key is checked: an unknown key, a wrong type or a value out of range stops
start-up with a :class:`ConfigError` that names the key (``providers.openai.kind``).
"""

from __future__ import annotations

import fnmatch
import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from providers.breaker import BreakerPolicy

__all__ = [
    "Config",
    "ConfigError",
    "Deployment",
    "ProviderConfig",
    "ProviderTimeouts",
    "RetryPolicy",
    "Route",
]

ProviderKind = Literal["openai", "anthropic"]
PROVIDER_KINDS: tuple[str, ...] = ("openai", "anthropic")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@attrs.frozen
class RetryPolicy:
    """How often one deployment is retried and how long the router waits between tries.

    Wait before retry *n* (n = 1 for the first retry) is
    ``min(backoff_base * backoff_factor ** (n - 1), backoff_max) * (1 + U(0, jitter))``:
    with the defaults 2.0-2.5 s, then 4.0-5.0 s.
    """

    max_attempts: int = 3
    backoff_base: float = 2.0
    backoff_factor: float = 2.0
    backoff_max: float = 30.0
    jitter: float = 0.25


@attrs.frozen
class ProviderTimeouts:
    """Per-attempt limits of one provider; every one is also capped by the request's deadline.

    ``attempt`` bounds a non-streaming attempt as a whole, and a streaming attempt until
    its response headers; ``first_token`` then bounds the wait for the first content
    chunk and ``idle`` the silence between later chunks.
    """

    attempt: float = 30.0
    connect: float = 5.0
    first_token: float = 30.0
    idle: float = 30.0


@attrs.frozen
class ProviderConfig:
    """One upstream provider; it gets its own actor, breaker and connection pool."""

    name: str
    kind: ProviderKind
    base_url: str
    api_key: str | None = attrs.field(default=None, repr=False)
    max_concurrency: int = 512
    timeouts: ProviderTimeouts = ProviderTimeouts()
    breaker: BreakerPolicy = BreakerPolicy()
    #: How long a 429 without a ``Retry-After`` header keeps the provider rate limited.
    rate_limit_seconds: float = 5.0
    #: Anthropic requires ``max_tokens``; used when the client sent none.
    default_max_tokens: int = 4096
    #: Independent connection pools per provider. httpcore's pool did bookkeeping over
    #: every connection per request, so several small pools beat one big one; the lean
    #: transport checks connections out in O(1), so one is enough unless measured otherwise.
    pool_shards: int = 1


@attrs.frozen
class Deployment:
    """A provider and the model name to ask it for.

    ``model`` None means "the model the client asked for". ``prefill`` says the
    deployment accepts an assistant prefill, so a broken stream can be continued on it.
    """

    provider: str
    model: str | None = None
    prefill: bool = False

    def upstream_model(self, requested: str) -> str:
        return self.model if self.model is not None else requested


@attrs.frozen
class Route:
    """Model names matching ``match`` (exact or glob) go to ``deployments`` in order."""

    match: str
    deployments: tuple[Deployment, ...]
    retry: RetryPolicy | None = None

    def matches(self, model: str) -> bool:
        if self.match == model:
            return True
        return _is_glob(self.match) and fnmatch.fnmatchcase(model, self.match)


@attrs.frozen
class Config:
    """The whole gateway configuration. Build it with a named constructor."""

    providers: tuple[ProviderConfig, ...]
    routes: tuple[Route, ...]
    retry: RetryPolicy = RetryPolicy()
    #: One budget per request covering all attempts, waits and failovers.
    deadline: float = 60.0
    #: Largest request body accepted, in bytes (larger gets 413 before it is read whole).
    max_body_bytes: int = 4 * 1024 * 1024
    #: Requests served at once by one gateway process; excess is shed with 503.
    max_in_flight: int = 2048
    #: Seeds the backoff jitter; None draws from the OS.
    seed: int | None = None
    #: Keys clients must present as ``Authorization: Bearer``; empty means open.
    client_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    #: Keys for run-time administration (breaker resets); empty disables those endpoints.
    admin_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    #: How long in-flight requests may finish after SIGTERM before they are cancelled.
    shutdown_grace: float | None = None
    #: How long a client may take to send its request body.
    body_timeout: float = 30.0
    #: How long an idle connection (or one still sending its request head) stays open.
    keep_alive: float = 5.0
    #: How long a client may take no byte of its answer before its connection is reset.
    send_timeout: float = 30.0

    def provider(self, name: str) -> ProviderConfig:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)

    def route_for(self, model: str) -> Route | None:
        """The first route whose pattern matches ``model``, exact matches first."""
        for route in self.routes:
            if route.match == model:
                return route
        for route in self.routes:
            if route.matches(model):
                return route
        return None

    def retry_for(self, route: Route) -> RetryPolicy:
        return route.retry if route.retry is not None else self.retry

    @property
    def grace_period(self) -> float:
        """Shutdown grace: explicit, else long enough for a request to use its deadline."""
        return self.shutdown_grace if self.shutdown_grace is not None else self.deadline + 1.0

    # -- named constructors -------------------------------------------------------

    @classmethod
    def default(cls, *, mock_url: str = "http://127.0.0.1:8001") -> Config:
        """The seed demo's set-up: openai then anthropic, both at the mock provider."""
        return cls.from_mapping(
            {
                "providers": {
                    "openai": {"kind": "openai", "base_url": f"{mock_url}/v1"},
                    "anthropic": {"kind": "anthropic", "base_url": mock_url},
                },
                "routes": [
                    {
                        "match": "gpt-*",
                        "deployments": [
                            {"provider": "openai"},
                            {"provider": "anthropic", "model": "claude-sonnet-4-5", "prefill": True},
                        ],
                    },
                    {
                        "match": "claude-*",
                        "deployments": [
                            {"provider": "anthropic", "prefill": True},
                            {"provider": "openai", "model": "gpt-4o"},
                        ],
                    },
                ],
            }
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Config:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as error:
            raise ConfigError(f"cannot read configuration file {os.fspath(path)!r}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{os.fspath(path)}: not valid TOML: {error}") from None
        return cls.from_mapping(data, environ=environ)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> Config:
        """Build and check a configuration from plain data (as TOML parses it)."""
        env = os.environ if environ is None else environ
        top = _Section(data, "")
        retry = _read_retry(top.section("retry"), RetryPolicy())

        providers_section = top.section("providers")
        providers = tuple(
            _read_provider(name, providers_section.section(name), env) for name in providers_section.keys()
        )
        providers_section.finish()
        if not providers:
            raise ConfigError("providers: at least one provider is required")
        names = {provider.name for provider in providers}

        routes = tuple(
            _read_route(_Section(item, f"routes[{index}]"), names)
            for index, item in enumerate(top.list("routes", dict))
        )
        if not routes:
            raise ConfigError("routes: at least one route is required")

        client_keys = _keys(top, "client_keys", env, "ORCHESTRATOR_CLIENT_KEYS")
        admin_keys = _keys(top, "admin_keys", env, "ORCHESTRATOR_ADMIN_KEYS")
        config = cls(
            providers=providers,
            routes=routes,
            retry=retry,
            deadline=top.number("deadline_seconds", _default(cls, "deadline"), minimum=0.001),
            max_body_bytes=top.integer("max_body_bytes", _default(cls, "max_body_bytes"), minimum=1024),
            max_in_flight=top.integer("max_in_flight", _default(cls, "max_in_flight"), minimum=1),
            seed=top.integer("seed", None),
            client_keys=client_keys,
            admin_keys=admin_keys,
            shutdown_grace=top.number("shutdown_grace_seconds", None, minimum=0.0),
            body_timeout=top.number("body_timeout_seconds", _default(cls, "body_timeout"), minimum=0.001),
            keep_alive=top.number("keep_alive_seconds", _default(cls, "keep_alive"), minimum=0.001),
            send_timeout=top.number("send_timeout_seconds", _default(cls, "send_timeout"), minimum=0.001),
        )
        top.finish()
        if set(client_keys) & set(admin_keys):
            raise ConfigError("admin_keys: an admin key must differ from every client key")
        return config


# -- reading and checking -----------------------------------------------------------

_MISSING = object()


def _default(cls: type, name: str) -> Any:
    """The attrs default of ``cls.name`` (slotted classes have no plain class attribute)."""
    return getattr(attrs.fields(cls), name).default


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


class _Section:
    """A TOML table being read: typed getters that name the key, and a check for leftovers."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'configuration'}: expected a table, got {_type_name(data)}")
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def keys(self) -> list[str]:
        self._seen.update(self._data)
        return list(self._data)

    def raw(self, name: str) -> Any:
        self._seen.add(name)
        return self._data.get(name, _MISSING)

    def section(self, name: str) -> _Section:
        value = self.raw(name)
        return _Section({} if value is _MISSING else value, self.key(name))

    def list(self, name: str, item_type: type) -> list[Any]:
        value = self.raw(name)
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(item, item_type) for item in value):
            raise ConfigError(f"{self.key(name)}: expected a list of {_type_name(item_type())}")
        return value

    def string(self, name: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            if default is _MISSING:
                raise ConfigError(f"{self.key(name)}: required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key(name)}: expected a non-empty string, got {_type_name(value)}")
        if choices and value not in choices:
            raise ConfigError(f"{self.key(name)}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {_type_name(value)}")
        return value

    def number(self, name: str, default: Any, *, minimum: float | None = None, maximum: float | None = None) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{self.key(name)}: expected a number, got {_type_name(value)}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.key(name)}: must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.key(name)}: must be at most {maximum}, got {value}")
        return float(value)

    def integer(self, name: str, default: Any, *, minimum: int | None = None) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer, got {_type_name(value)}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.key(name)}: must be at least {minimum}, got {value}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _type_name(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _read_retry(section: _Section, base: RetryPolicy) -> RetryPolicy:
    policy = RetryPolicy(
        max_attempts=section.integer("max_attempts", base.max_attempts, minimum=1),
        backoff_base=section.number("backoff_base_seconds", base.backoff_base, minimum=0.0),
        backoff_factor=section.number("backoff_factor", base.backoff_factor, minimum=1.0),
        backoff_max=section.number("backoff_max_seconds", base.backoff_max, minimum=0.0),
        jitter=section.number("jitter", base.jitter, minimum=0.0, maximum=1.0),
    )
    section.finish()
    return policy


def _read_provider(name: str, section: _Section, env: Mapping[str, str]) -> ProviderConfig:
    kind = section.string("kind", choices=PROVIDER_KINDS)
    base_url = section.string("base_url").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{section.key('base_url')}: must start with http:// or https://")
    api_key = section.string("api_key", None)
    key_env = section.string("api_key_env", DEFAULT_KEY_ENV[kind])
    if api_key is None:
        api_key = env.get(key_env) or None
    defaults = ProviderTimeouts()
    timeouts = ProviderTimeouts(
        attempt=section.number("attempt_timeout_seconds", defaults.attempt, minimum=0.001),
        connect=section.number("connect_timeout_seconds", defaults.connect, minimum=0.001),
        first_token=section.number("first_token_timeout_seconds", defaults.first_token, minimum=0.001),
        idle=section.number("idle_timeout_seconds", defaults.idle, minimum=0.001),
    )
    breaker_section = section.section("breaker")
    base_policy = BreakerPolicy()
    breaker_settings = dict(
        failure_threshold=breaker_section.integer("failure_threshold", base_policy.failure_threshold, minimum=1),
        open_interval=breaker_section.number("open_seconds", base_policy.open_interval, minimum=0.001),
        max_open_interval=breaker_section.number("max_open_seconds", base_policy.max_open_interval, minimum=0.001),
    )
    try:
        breaker = BreakerPolicy(**breaker_settings)
    except ValueError as error:  # the cross-field checks: max_open_seconds below open_seconds
        raise ConfigError(f"{breaker_section.key('max_open_seconds')}: {error}") from None
    breaker_section.finish()
    provider = ProviderConfig(
        name=name,
        kind=kind,
        base_url=base_url,
        api_key=api_key,
        max_concurrency=section.integer("max_concurrency", _default(ProviderConfig, "max_concurrency"), minimum=1),
        timeouts=timeouts,
        breaker=breaker,
        rate_limit_seconds=section.number("rate_limit_seconds", _default(ProviderConfig, "rate_limit_seconds"), minimum=0.0),
        default_max_tokens=section.integer("default_max_tokens", _default(ProviderConfig, "default_max_tokens"), minimum=1),
        pool_shards=section.integer("pool_shards", _default(ProviderConfig, "pool_shards"), minimum=1),
    )
    section.finish()
    return provider


def _read_route(section: _Section, provider_names: set[str]) -> Route:
    match = section.string("match")
    deployments = []
    for index, item in enumerate(section.list("deployments", dict)):
        item_section = _Section(item, section.key(f"deployments[{index}]"))
        provider = item_section.string("provider")
        if provider not in provider_names:
            raise ConfigError(f"{item_section.key('provider')}: no provider named {provider!r}")
        deployments.append(
            Deployment(
                provider=provider,
                model=item_section.string("model", None),
                prefill=item_section.boolean("prefill", False),
            )
        )
        item_section.finish()
    if not deployments:
        raise ConfigError(f"{section.key('deployments')}: at least one deployment is required")
    retry_section = section.raw("retry")
    retry = None
    if retry_section is not _MISSING:
        retry = _read_retry(_Section(retry_section, section.key("retry")), RetryPolicy())
    section.finish()
    return Route(match=match, deployments=tuple(deployments), retry=retry)


def _keys(section: _Section, name: str, env: Mapping[str, str], env_name: str) -> tuple[str, ...]:
    keys = section.list(name, str)
    from_env = [key.strip() for key in env.get(env_name, "").split(",") if key.strip()]
    combined = tuple(dict.fromkeys([*keys, *from_env]))
    if any(len(key) < 8 for key in combined):
        raise ConfigError(f"{section.key(name)}: every key must be at least 8 characters")
    return combined
