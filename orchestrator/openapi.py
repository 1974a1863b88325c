"""The gateway's OpenAPI 3.1 description, built from its configuration.

``document(config)`` returns the description of the gateway that ``config`` makes, and
lists only what exists there: the admin endpoint only when admin keys are configured,
bearer authentication only when client keys are. The app builds it once and serves
its bytes at ``GET /openapi.json``.

The request schema states exactly the rules of :mod:`orchestrator.validation`, no
looser and no stricter, so that a generator (schemathesis, in the test suite) can
trust it both ways: a body the schema accepts is routed and answered, a body it
refuses gets a 4xx. That is why a few fields have no schema at all (the validator
forwards them unread and the provider judges them), why ``null`` is allowed on every
optional field (null means "the default", as for OpenAI), and why ``model`` is a
pattern built from the routes: a model no route matches is a 404, not a valid request.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from orchestrator.config import Config, Route
from orchestrator.validation import MAX_STOP_SEQUENCES, MODEL_FORBIDDEN, ROLES, STEERING_FIELDS, USER_PART_TYPES

__all__ = ["document"]

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
SSE = "text/event-stream"
Schema = dict[str, Any]

#: A character Python's ``str.strip()`` keeps: a model name needs one. Spelled out
#: because ECMA's ``\s`` and Python's whitespace differ (\x1c-\x1f, \x85, \ufeff).
NOT_BLANK = (
    r"[^\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)
#: The longest model name the validator accepts.
MAX_MODEL_LENGTH = 256
#: orjson reads larger integers as floats, which the validator refuses as non-integers.
MAX_JSON_INTEGER = 2**64 - 1
INT64 = (-(2**63), 2**63 - 1)


def document(config: Config) -> dict[str, Any]:
    """The OpenAPI document describing the gateway that ``config`` configures."""
    paths: dict[str, Any] = {
        "/v1/chat/completions": {"post": _chat_completions(config)},
        "/v1/models": {"get": _models(config)},
        "/health": {"get": _health()},
        "/openapi.json": {"get": _openapi()},
    }
    security_schemes: dict[str, Any] = {}
    if config.client_keys:
        security_schemes["clientKey"] = _bearer("A client key from the gateway's `client_keys`.")
    if config.admin_keys:
        paths["/admin/providers/{name}/reset"] = {"post": _reset_provider(config)}
        security_schemes["adminKey"] = _bearer("An admin key from the gateway's `admin_keys`.")
    components: dict[str, Any] = {"schemas": _schemas(config), "headers": HEADERS}
    if security_schemes:
        components["securitySchemes"] = security_schemes
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "orchestrator",
            "version": "0.1.0",
            "description": (
                "A resilient OpenAI-compatible LLM gateway: retries, failover, circuit breakers, "
                "one deadline per request. Every response carries `x-request-id`, "
                "`x-orchestrator-provider` and `x-orchestrator-attempts`; every error has "
                "OpenAI's shape."
            ),
        },
        "paths": paths,
        "components": components,
    }


# -- operations ---------------------------------------------------------------------


def _chat_completions(config: Config) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": "createChatCompletion",
        "summary": "Chat completion, as JSON or (with `\"stream\": true`) server-sent events",
        "description": (
            "OpenAI's chat completions. The body is read as JSON whatever the Content-Type. "
            "Retries and failovers happen inside the request, within one deadline. A stream "
            "that breaks after its first token ends with an error event "
            "`data: {\"error\": {...}}` and no `data: [DONE]`, unless it could be continued."
        ),
        "parameters": [PARAMETERS["RequestId"], PARAMETERS["RequestTimeout"]],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": _ref("ChatCompletionRequest"), "examples": _request_examples(config)}},
        },
        "responses": {
            "200": _response(
                "The answer: a `chat.completion` object, or with `\"stream\": true` an event "
                "stream of `chat.completion.chunk` objects ending with `data: [DONE]`.",
                {
                    JSON: {"schema": _ref("ChatCompletion")},
                    SSE: {"schema": _ref("ChatCompletionEvent")},
                },
            ),
            "400": _error("The request cannot succeed (`param` names the field), or a provider rejected it."),
            **_unauthorized(config.client_keys),
            "404": _error("No route matches the model (`model_not_found`)."),
            "413": _error("The body is larger than `max_body_bytes` (`request_too_large`)."),
            "429": _error(
                "Every deployment is rate limited past the deadline (`rate_limit_exceeded`).", retry_after=True
            ),
            "4XX": _error("A provider rejected the request: its error, passed through."),
            "500": _error("An internal error; it has been logged."),
            "502": _error("Every deployment was tried and failed (`all_providers_failed`)."),
            "503": _error(
                "Circuits open, providers saturated, or the gateway at its in-flight limit "
                "(`service_unavailable`).",
                retry_after=True,
            ),
            "504": _error("The request's deadline was spent (`deadline_exceeded`)."),
        },
    }
    return _secured(operation, "clientKey" if config.client_keys else None)


def _models(config: Config) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": "listModels",
        "summary": "The routed models; glob routes are marked `\"pattern\": true`",
        "responses": {
            "200": _response("The routes, in OpenAI's model-list shape.", {JSON: {"schema": _ref("ModelList")}}),
            **_unauthorized(config.client_keys),
            "500": _error("An internal error; it has been logged."),
        },
    }
    return _secured(operation, "clientKey" if config.client_keys else None)


def _health() -> dict[str, Any]:
    return {
        "operationId": "health",
        "summary": "Liveness, and each provider's circuit, rate limit, load and outcome totals",
        "description": "Open even when client keys are configured.",
        "responses": {
            "200": _response("The gateway answers.", {JSON: {"schema": _ref("Health")}}),
            "500": _error("An internal error; it has been logged."),
        },
    }


def _openapi() -> dict[str, Any]:
    return {
        "operationId": "openapi",
        "summary": "This document",
        "responses": {
            "200": _response("The OpenAPI description of this gateway.", {JSON: {"schema": {"type": "object"}}}),
            "500": _error("An internal error; it has been logged."),
        },
    }


def _reset_provider(config: Config) -> dict[str, Any]:
    names = [provider.name for provider in config.providers]
    operation = {
        "operationId": "resetProvider",
        "summary": "Close a provider's circuit and clear its rate limit (admin key only)",
        "parameters": [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}
        ],
        "responses": {
            "200": _response(
                "The provider's state after the reset.", {JSON: {"schema": _ref("ProviderResetResult")}}
            ),
            **_unauthorized(config.admin_keys),
            "404": _error("No provider has that name (`not_found`)."),
            "500": _error("An internal error; it has been logged."),
        },
    }
    return _secured(operation, "adminKey")


def _bearer(description: str) -> dict[str, Any]:
    return {"type": "http", "scheme": "bearer", "description": description}


def _secured(operation: dict[str, Any], scheme: str | None) -> dict[str, Any]:
    if scheme is not None:
        operation["security"] = [{scheme: []}]
    return operation


def _unauthorized(keys: tuple[str, ...]) -> dict[str, Any]:
    if not keys:
        return {}
    return {"401": _error("No valid `Authorization: Bearer <key>` was presented (`invalid_api_key`).")}


# -- responses and headers ----------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _header_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _response(description: str, content: dict[str, Any], *, retry_after: bool = False) -> dict[str, Any]:
    headers = {
        "x-request-id": _header_ref("RequestId"),
        "x-orchestrator-provider": _header_ref("Provider"),
        "x-orchestrator-attempts": _header_ref("Attempts"),
        "x-should-retry": _header_ref("ShouldRetry"),
    }
    if retry_after:
        headers["retry-after"] = _header_ref("RetryAfter")
    return {"description": description, "headers": headers, "content": content}


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    return _response(description, {JSON: {"schema": _ref("Error")}}, retry_after=retry_after)


HEADERS: dict[str, Any] = {
    "RequestId": {
        "description": "The request's id: the client's `X-Request-ID` if it was sane, else a generated one.",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    },
    "Provider": {
        "description": "The provider that answered, or the last one tried; `none` when no provider was asked.",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    },
    "Attempts": {
        "description": "Upstream calls made for this request.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    "ShouldRetry": {
        "description": "`false` when the gateway already retried: an SDK should not retry again.",
        "schema": {"type": "string", "enum": ["false"]},
    },
    "RetryAfter": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    },
}

PARAMETERS: dict[str, Any] = {
    "RequestId": {
        "name": "X-Request-ID",
        "in": "header",
        "description": (
            "Your id for the request (letters, digits, `._:-`, up to 128, starting with a letter or "
            "digit); kept if sane, else one is generated. It is on every log line and in "
            "`x-request-id`."
        ),
        "schema": {"type": "string"},
    },
    "RequestTimeout": {
        "name": "X-Request-Timeout",
        "in": "header",
        "description": "Seconds: lowers the request's deadline (never raises it above the configured one).",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    },
}


# -- schemas ------------------------------------------------------------------------


def _nullable(schema: Schema) -> Schema:
    """``schema`` or null: an optional field's null means its default, as for OpenAI."""
    kind = schema["type"]
    return {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


def _number(low: float, high: float, description: str) -> Schema:
    return _nullable({"type": "number", "minimum": low, "maximum": high, "description": description})


def _integer(low: int, high: int, description: str) -> Schema:
    return _nullable({"type": "integer", "minimum": low, "maximum": high, "description": description})


def _typed(kind: str, description: str) -> Schema:
    return _nullable({"type": kind, "description": description})


def _forwarded(description: str) -> Schema:
    """A field the gateway forwards unread: any JSON value, the provider judges it."""
    return {"description": f"{description} Forwarded as it is; the provider judges it."}


def _schemas(config: Config) -> dict[str, Schema]:
    return {
        "ChatCompletionRequest": _chat_request(config),
        "Unsteered": UNSTEERED,
        **_message_schemas(),
        "ChatCompletion": CHAT_COMPLETION,
        "ChatCompletionEvent": CHAT_COMPLETION_EVENT,
        "ChatCompletionChunk": CHAT_COMPLETION_CHUNK,
        "Error": ERROR,
        "ModelList": MODEL_LIST,
        "Health": HEALTH,
        "ProviderState": PROVIDER_STATE,
        "ProviderResetResult": {
            "allOf": [_ref("ProviderState")],
            "required": ["provider"],
            "properties": {"provider": {"type": "string"}},
        },
    }


def _chat_request(config: Config) -> Schema:
    return {
        "type": "object",
        "description": (
            "OpenAI's chat-completions request. Unknown fields are refused, and so are fields "
            "that would steer the upstream (`api_base`, `base_url`, `api_key`, `api_version`, "
            "`azure_endpoint`, `api_type`, `custom_llm_provider`) at any depth."
        ),
        "required": ["model", "messages"],
        "additionalProperties": False,
        "properties": {
            "model": _model(config),
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": _ref("Message"),
                "description": "The conversation so far; a final assistant message is continued (prefill).",
            },
            "stream": _typed("boolean", "Answer as server-sent events."),
            "stream_options": _nullable(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "include_usage": {"type": "boolean"},
                        "include_obfuscation": {"type": "boolean"},
                    },
                    "description": "Only with `\"stream\": true`; `include_usage` adds a final usage chunk.",
                }
            ),
            "temperature": _number(0, 2, "Sampling temperature."),
            "top_p": _number(0, 1, "Nucleus sampling mass."),
            "n": _integer(1, 128, "Choices to generate."),
            "max_tokens": _integer(1, MAX_JSON_INTEGER, "Longest answer, in tokens."),
            "max_completion_tokens": _integer(
                1, MAX_JSON_INTEGER, "Longest answer, in tokens (not together with `max_tokens`)."
            ),
            "presence_penalty": _number(-2, 2, "Penalty on tokens already present."),
            "frequency_penalty": _number(-2, 2, "Penalty by token frequency."),
            "logit_bias": _nullable(
                {
                    "type": "object",
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                    "description": "Token id to bias, from -100 to 100.",
                }
            ),
            "logprobs": _typed("boolean", "Return log probabilities."),
            "top_logprobs": _integer(0, 20, "Most likely tokens to return at each position."),
            "seed": _integer(*INT64, "Best-effort determinism."),
            "stop": {
                # items and maxItems bind only arrays: a string, a list of strings, or null.
                "type": ["string", "array", "null"],
                "items": {"type": "string"},
                "maxItems": MAX_STOP_SEQUENCES,
                "description": f"Up to {MAX_STOP_SEQUENCES} sequences where the answer stops.",
            },
            "user": _typed("string", "An id of the end user."),
            "tools": _nullable(
                {"type": "array", "items": _ref("Tool"), "description": "Functions the model may call."}
            ),
            "tool_choice": {
                "anyOf": [
                    {"type": "string", "enum": ["none", "auto", "required"]},
                    {
                        "type": "object",
                        "required": ["type", "function"],
                        "properties": {
                            "type": {"const": "function"},
                            "function": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}},
                            },
                        },
                    },
                    {"type": "null"},
                ],
                "description": "Whether and which tool to call.",
            },
            "parallel_tool_calls": _typed("boolean", "Allow several tool calls in one answer."),
            "response_format": _nullable(
                {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
                    "description": "The answer's format.",
                }
            ),
            "reasoning_effort": _typed("string", "Reasoning effort, for models that reason."),
            "service_tier": _typed("string", "The provider's service tier."),
            "store": _typed("boolean", "Ask the provider to store the completion."),
            "metadata": _typed("object", "Key-value pairs for the provider."),
            "audio": _typed("object", "Audio output parameters."),
            "prediction": _typed("object", "Predicted output."),
            "web_search_options": _typed("object", "Web search parameters."),
            "modalities": _nullable(
                {"type": "array", "items": {"type": "string"}, "description": "Output modalities."}
            ),
            "functions": _nullable(
                {"type": "array", "items": {"type": "object"}, "description": "The legacy function-calling API."}
            ),
            "function_call": _nullable(
                {"type": ["string", "object"], "description": "The legacy function-calling API."}
            ),
        },
        "allOf": [
            {
                "description": "`stream_options` only when `stream` is true.",
                "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
            },
            _ref("Unsteered"),
            {
                "description": "`max_tokens` or `max_completion_tokens`, not both.",
                "not": {
                    "required": ["max_tokens", "max_completion_tokens"],
                    "properties": {
                        "max_tokens": {"not": {"type": "null"}},
                        "max_completion_tokens": {"not": {"type": "null"}},
                    },
                },
            },
        ],
    }


def _model(config: Config) -> Schema:
    """The routed model names: an enum when every route is exact, else a pattern."""
    routes = ", ".join(f"`{route.match}`" for route in config.routes)
    schema: Schema = {
        "type": "string",
        "maxLength": MAX_MODEL_LENGTH,
        "description": f"A model some route matches ({routes}); exact routes win over globs. See `GET /v1/models`.",
        # A glob route matches control characters too; the validator refuses them.
        "not": {"pattern": MODEL_FORBIDDEN},
    }
    names = [route.match for route in config.routes]
    if not any(_is_glob(name) for name in names) and all(map(_usable_model_name, names)):
        schema["enum"] = names
    else:
        schema["pattern"] = "^(?:" + "|".join(map(_route_regex, names)) + ")$"
        # A second pattern cannot share the schema, so the non-blank rule goes in allOf.
        schema["allOf"] = [{"pattern": NOT_BLANK}]
    samples = [sample for sample in map(_sample_model, config.routes) if sample is not None]
    if samples:
        schema["examples"] = samples
    return schema


def _is_glob(match: str) -> bool:
    return any(char in match for char in "*?[")


def _usable_model_name(name: str) -> bool:
    return bool(name.strip()) and len(name) <= MAX_MODEL_LENGTH


def _sample_model(route: Route) -> str | None:
    """A model name ``route`` serves, for examples (None for bracket globs)."""
    if "[" in route.match:
        return None
    return route.match.replace("*", "4").replace("?", "x")


def _route_regex(match: str) -> str:
    """What :meth:`Route.matches` matches: the glob, and the route's own name as it is
    (which a glob such as ``[[]`` does not match)."""
    regex = _glob_regex(match)
    if _is_glob(match) and not fnmatch.fnmatchcase(match, match):
        regex += "|" + "".join(map(_literal, match))
    return regex


#: Characters a regex reads as syntax: backslash-escaped outside a class, as ECMA allows
#: even in unicode mode. Inside a class a few more, written as ``\xHH`` so that no two
#: of them double up into what Python reads as a set operation (``&&``, ``--``).
_SYNTAX = frozenset("\\^$.|?*+()[]{}/")
_CLASS_SYNTAX = _SYNTAX | frozenset("-&~")


def _literal(char: str) -> str:
    return "\\" + char if char in _SYNTAX else char


def _class_member(char: str) -> str:
    return f"\\x{ord(char):02x}" if char in _CLASS_SYNTAX else char


def _glob_regex(glob: str) -> str:
    """An unanchored regex, valid in ECMA and Python alike, matching what
    :func:`fnmatch.fnmatchcase` matches with ``glob`` (``*`` and ``?`` cross newlines too)."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        i += 1
        if char == "*":
            if not out or out[-1] != r"[\s\S]*":
                out.append(r"[\s\S]*")
        elif char == "?":
            out.append(r"[\s\S]")
        elif char == "[" and (end := _class_end(glob, i)) is not None:
            out.append(_glob_class(glob[i:end]))
            i = end + 1
        else:
            out.append(_literal(char))
    return "".join(out)


def _class_end(glob: str, start: int) -> int | None:
    """Where the bracket class opened before ``start`` closes (fnmatch: a ``]`` first is a
    member); None when it never closes and the ``[`` is a literal."""
    end = start
    if end < len(glob) and glob[end] == "!":
        end += 1
    if end < len(glob) and glob[end] == "]":
        end += 1
    end = glob.find("]", end)
    return None if end < 0 else end


def _glob_class(body: str) -> str:
    """A bracket class's body (``!a-z_``) as an ECMA class; fnmatch drops empty ranges."""
    negated = body.startswith("!")
    if negated:
        body = body[1:]
    members: list[str] = []
    i = 0
    while i < len(body):
        low = body[i]
        if i + 2 < len(body) and body[i + 1] == "-":
            high = body[i + 2]
            if low <= high:
                members.append(f"{_class_member(low)}-{_class_member(high)}")
            i += 3
        else:
            members.append(_class_member(low))
            i += 1
    if not members:
        return r"[\s\S]" if negated else "(?!)"
    return "[" + ("^" if negated else "") + "".join(members) + "]"


def _request_examples(config: Config) -> dict[str, Any]:
    samples = [sample for sample in map(_sample_model, config.routes) if sample is not None]
    if not samples:
        return {}
    messages = [{"role": "user", "content": "hello"}]
    return {
        "plain": {"summary": "A plain request", "value": {"model": samples[0], "messages": messages}},
        "streamed": {
            "summary": "A streamed answer with a final usage chunk",
            "value": {
                "model": samples[0],
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        },
    }


def _steering_pattern() -> str:
    """Keys the validator refuses at any depth: those whose ``lower()`` is a steering field.

    Each letter is a class of what lowers to it: its two cases, and for ``k`` the Kelvin
    sign (U+212A), the one non-ASCII character that lowers to an ASCII letter.
    """

    def spellings(char: str) -> str:
        variants = sorted({char, char.upper(), *(["\u212a"] if char == "k" else [])})
        return f"[{''.join(variants)}]" if len(variants) > 1 else char

    names = ("".join(map(spellings, field)) for field in sorted(STEERING_FIELDS))
    return "^(?:" + "|".join(names) + ")$"


#: Any JSON value without a steering key in it, at any depth (the schema applies itself to
#: every property and item).
UNSTEERED: Schema = {
    "description": "No key anywhere may name the upstream or its credentials.",
    "propertyNames": {"not": {"pattern": _steering_pattern()}},
    "additionalProperties": {"$ref": "#/components/schemas/Unsteered"},
    "items": {"$ref": "#/components/schemas/Unsteered"},
}


# -- messages -------------------------------------------------------------------------

#: JSON values Python finds true: what "has tool_calls or function_call" means to the validator.
TRUTHY: Schema = {"not": {"enum": [None, False, 0, "", [], {}]}}

TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
IMAGE_PART: Schema = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {
        "type": {"const": "image_url"},
        "image_url": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}},
    },
}


def _bare_part(kind: str) -> Schema:
    """A content part checked only for its type; the provider judges the rest."""
    return {"type": "object", "required": ["type"], "properties": {"type": {"const": kind}}}


_PART_SCHEMAS = {"text": TEXT_PART, "image_url": IMAGE_PART}
USER_PARTS = sorted(USER_PART_TYPES)
OTHER_PARTS = ["refusal", "text"]


def _content(parts: list[str], *, nullable: bool) -> Schema:
    kinds = ["string", "array", "null"] if nullable else ["string", "array"]
    return {
        "type": kinds,
        "items": {"oneOf": [_PART_SCHEMAS.get(kind) or _bare_part(kind) for kind in parts]},
        "description": f"Text, or a list of content parts ({', '.join(parts)}).",
    }


def _message(role: str) -> Schema:
    """One role's message, as :func:`orchestrator.validation._message` checks it."""
    properties: Schema = {
        "role": {"const": role},
        "content": _content(USER_PARTS if role == "user" else OTHER_PARTS, nullable=role in ("assistant", "function")),
        "name": {"type": "string"},
    }
    required = ["role"]
    schema: Schema = {"type": "object", "required": required, "properties": properties}
    if role == "assistant":
        properties["tool_calls"] = {"type": ["array", "null"], "items": _ref("ToolCall")}
        properties["function_call"] = _forwarded("The legacy function call.")
        schema["anyOf"] = [
            {"required": ["content"]},
            {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
            {"required": ["function_call"], "properties": {"function_call": TRUTHY}},
        ]
        schema["description"] = "Needs `content` (null allowed), or non-empty `tool_calls` or `function_call`."
    else:
        properties["tool_calls"] = {"type": "null", "description": "Only assistant messages make tool calls."}
        if role != "function":
            required.append("content")
    if role == "tool":
        properties["tool_call_id"] = {"type": "string"}
        required.append("tool_call_id")
    return schema


def _message_schemas() -> dict[str, Schema]:
    names = {role: f"{role.capitalize()}Message" for role in ROLES}
    return {
        "Message": {"oneOf": [_ref(name) for name in names.values()]},
        **{name: _message(role) for role, name in names.items()},
        "ToolCall": {
            "type": "object",
            "required": ["function"],
            "properties": {
                "function": {
                    "type": "object",
                    "required": ["name", "arguments"],
                    "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
                }
            },
        },
        "Tool": {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "parameters": {"type": "object", "description": "The arguments' JSON Schema."},
                    },
                },
            },
        },
    }


# -- answers ---------------------------------------------------------------------------

CHAT_COMPLETION: Schema = {
    "type": "object",
    "description": "OpenAI's `chat.completion`; `model` names the model that actually answered.",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "required": ["role"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": {"type": ["string", "null"]},
                            "tool_calls": {"type": "array"},
                        },
                    },
                    "finish_reason": {"type": "string"},
                },
            },
        },
        "usage": {
            "type": "object",
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "completion_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
            },
        },
    },
}

CHAT_COMPLETION_CHUNK: Schema = {
    "type": "object",
    "description": "OpenAI's `chat.completion.chunk`; the usage chunk has no choices.",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion.chunk"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "delta"],
                "properties": {
                    "index": {"type": "integer"},
                    "delta": {"type": "object"},
                    "finish_reason": {"type": ["string", "null"]},
                },
            },
        },
        "usage": {"type": ["object", "null"]},
    },
}

#: One server-sent event of a streamed answer (OpenAPI before 3.2 has ``schema`` describe
#: each event of an event stream): a chunk, the final ``[DONE]``, or after the first
#: token an error that ends the stream without ``[DONE]``.
CHAT_COMPLETION_EVENT: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": JSON,
                    "contentSchema": {"oneOf": [_ref("ChatCompletionChunk"), _ref("Error")]},
                },
            ]
        }
    },
}

ERROR: Schema = {
    "type": "object",
    "description": "OpenAI's error shape, with the request id and the attempts made.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"], "description": "The field at fault."},
                "code": {"type": ["string", "null"]},
                "request_id": {"type": "string"},
                "attempts": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["attempt", "provider", "model", "outcome", "elapsed_ms"],
                        "properties": {
                            "attempt": {
                                "type": ["integer", "null"],
                                "description": "null: skipped without a call (circuit open, rate limited, ...).",
                            },
                            "provider": {"type": "string"},
                            "model": {"type": "string"},
                            "outcome": {"type": "string"},
                            "elapsed_ms": {"type": "number"},
                            "status": {"type": "integer"},
                        },
                    },
                },
            },
        }
    },
}

MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by", "pattern", "providers"],
                "properties": {
                    "id": {"type": "string", "description": "The route: an exact name or a glob."},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                    "pattern": {"type": "boolean", "description": "The id is a glob."},
                    "providers": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_SECONDS_LEFT: Schema = {"type": ["number", "null"], "minimum": 0}

PROVIDER_STATE: Schema = {
    "type": "object",
    "required": [
        "kind", "circuit", "consecutive_failures", "open_for_seconds", "rate_limited",
        "rate_limited_for_seconds", "in_flight", "max_concurrency", "totals",
    ],
    "properties": {
        "kind": {"enum": ["openai", "anthropic"]},
        "circuit": {"enum": ["closed", "open", "half_open"]},
        "consecutive_failures": {"type": "integer", "minimum": 0},
        "open_for_seconds": _SECONDS_LEFT,
        "rate_limited": {"type": "boolean"},
        "rate_limited_for_seconds": _SECONDS_LEFT,
        "in_flight": {"type": "integer", "minimum": 0},
        "max_concurrency": {"type": "integer", "minimum": 1},
        "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}  # fmt: skip

HEALTH: Schema = {
    "type": "object",
    "required": ["status", "in_flight", "max_in_flight", "providers"],
    "properties": {
        "status": {"const": "healthy"},
        "in_flight": {"type": "integer", "minimum": 0},
        "max_in_flight": {"type": "integer", "minimum": 1},
        "providers": {"type": "object", "additionalProperties": _ref("ProviderState")},
    },
}
