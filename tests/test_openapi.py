"""The OpenAPI document: valid, exactly the app's routes, and the validator's own rules."""

from __future__ import annotations

import fnmatch
import json
import sys
from typing import Any

import attrs
import jsonschema_rs
import orjson
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import openapi
from orchestrator.app import create_app
from orchestrator.config import Config
from orchestrator.errors import InvalidRequest
from orchestrator.service import open_orchestrator
from orchestrator.validation import STEERING_FIELDS, parse_body, validate_chat_request

USER = [{"role": "user", "content": "hi"}]
CALL = {"name": "f", "arguments": "{}"}
KEYS = {"client_keys": ("sk-client-0123456789",), "admin_keys": ("sk-admin-0123456789",)}


def config_with(**changes: Any) -> Config:
    return attrs.evolve(Config.default(), **changes)


def routes_config(*matches: str) -> Config:
    return config_with(routes=tuple(attrs.evolve(Config.default().routes[0], match=match) for match in matches))


def request_validator(document: dict[str, Any]) -> jsonschema_rs.Validator:
    """A JSON Schema 2020-12 validator for the document's chat request (OpenAPI 3.1's dialect)."""
    return jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/ChatCompletionRequest", "components": document["components"]}
    )


def gateway_accepts(config: Config, body: dict[str, Any]) -> bool:
    """What the gateway does before any provider call: validate, then find a route."""
    try:
        request = validate_chat_request(body)
    except InvalidRequest:
        return False
    return config.route_for(request.model) is not None


# -- the document ---------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, {"client_keys": KEYS["client_keys"]}, KEYS], ids=["open", "client", "admin"])
def test_the_document_is_valid_openapi(changes):
    document = openapi.document(config_with(**changes))
    assert document["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(document).validate()  # raises on a document OpenAPI's schema refuses
    orjson.dumps(document)  # and it is JSON as it stands


def test_the_admin_endpoint_and_the_bearer_schemes_appear_only_when_configured():
    open_document = openapi.document(Config.default())
    assert not any(path.startswith("/admin/") for path in open_document["paths"])
    assert "securitySchemes" not in open_document["components"]
    assert all("security" not in operation for item in open_document["paths"].values() for operation in item.values())

    document = openapi.document(config_with(**KEYS))
    assert set(document["components"]["securitySchemes"]) == {"clientKey", "adminKey"}
    paths = document["paths"]
    assert paths["/v1/chat/completions"]["post"]["security"] == [{"clientKey": []}]
    assert paths["/v1/models"]["get"]["security"] == [{"clientKey": []}]
    assert paths["/admin/providers/{name}/reset"]["post"]["security"] == [{"adminKey": []}]
    assert "security" not in paths["/health"]["get"]  # /health stays open
    assert "401" in paths["/v1/chat/completions"]["post"]["responses"]
    assert "401" not in open_document["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_every_response_documents_the_error_shape_and_the_journey_headers():
    document = openapi.document(config_with(**KEYS))
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                where = f"{method.upper()} {path} {status}"
                assert {"x-request-id", "x-orchestrator-provider", "x-orchestrator-attempts", "x-should-retry"} <= set(
                    response["headers"]
                ), where
                if not status.startswith("2"):
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "404", "413", "429", "4XX", "500", "502", "503", "504"} <= set(chat)
    assert "retry-after" in chat["429"]["headers"] and "retry-after" in chat["503"]["headers"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}


@pytest.mark.parametrize("changes", [{}, KEYS], ids=["open", "admin"])
async def test_the_document_lists_exactly_the_apps_routes(changes):
    config = config_with(**changes)
    async with open_orchestrator(config) as gw:
        app = create_app(gw)
        routed = {
            (_openapi_path(rule.rule), method.lower())
            for rule in app.url_map.iter_rules()
            for method in rule.methods - {"HEAD", "OPTIONS"}
        } | {(path, method.lower()) for path, method in app.front_routes}
        client = app.test_client()
        served = await client.get("/openapi.json")
        assert served.status_code == 200
        assert served.content_type == "application/json"
        assert await served.get_json() == openapi.document(config)
    documented = {(path, method) for path, item in openapi.document(config)["paths"].items() for method in item}
    if not config.admin_keys:
        # Without an admin key the admin API does not exist: its route answers 404.
        routed = {(path, method) for path, method in routed if not path.startswith("/admin/")}
    assert documented == routed


def _openapi_path(rule: str) -> str:
    """``/admin/providers/<name>/reset`` as OpenAPI spells it: ``/admin/providers/{name}/reset``."""
    return rule.replace("<", "{").replace(">", "}")


# -- the request schema against the validator -------------------------------------------

VALID = [
    {"model": "gpt-4", "messages": USER},
    {"model": "claude-sonnet-4-5", "messages": USER, "stream": True, "stream_options": {"include_usage": True}},
    {"model": "gpt-4", "messages": USER, "temperature": None, "max_tokens": None, "max_completion_tokens": 5},
    {"model": "gpt-4", "messages": USER, "temperature": 2, "top_p": 0, "n": 128, "seed": -(2**63), "stop": ["a"] * 4},
    {"model": "gpt-4", "messages": USER, "max_tokens": 2**64 - 1, "logit_bias": {"50256": -100}},
    {"model": "gpt-4", "messages": [{"role": "assistant", "content": None}]},
    {"model": "gpt-4", "messages": [{"role": "assistant", "tool_calls": [{"function": CALL}]}]},
    {"model": "gpt-4", "messages": [{"role": "assistant", "function_call": {"name": "f"}}]},
    {"model": "gpt-4", "messages": [{"role": "function", "name": "f"}]},
    {"model": "gpt-4", "messages": [{"role": "tool", "content": "42", "tool_call_id": "call_1"}]},
    {"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"model": "gpt-4", "messages": [{"role": "system", "content": [{"type": "refusal"}]}, *USER]},
    {"model": "gpt-4", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
     "tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"model": "gpt-4", "messages": USER, "response_format": {"type": "json_schema"}, "metadata": {"k": "v"}},
    {"model": "gpt-4", "messages": USER, "functions": [{"name": "f"}], "modalities": ["text"], "function_call": "auto"},
]  # fmt: skip

INVALID = [
    {"messages": USER},
    {"model": "gpt-4"},
    {"model": "", "messages": USER},
    {"model": "   ", "messages": USER},
    {"model": "gpt-" + "x" * 253, "messages": USER},
    {"model": "llama-3", "messages": USER},  # no route: a 404
    {"model": "gpt-4", "messages": []},
    {"model": "gpt-4", "messages": USER, "api_base": "http://evil"},
    {"model": "gpt-4", "messages": USER, "metadata": {"nested": [{"API_KEY": "x"}]}},
    {"model": "gpt-4", "messages": [{"role": "user", "content": "x", "Base_Url": "http://evil"}]},
    {"model": "gpt-4", "messages": USER, "unknown_field": 1},
    {"model": "gpt-4", "messages": USER, "temperature": 2.5},
    {"model": "gpt-4", "messages": USER, "temperature": True},
    {"model": "gpt-4", "messages": USER, "n": 0},
    {"model": "gpt-4", "messages": USER, "seed": 2**63},
    {"model": "gpt-4", "messages": USER, "max_tokens": 1, "max_completion_tokens": 1},
    {"model": "gpt-4", "messages": USER, "stream_options": {"include_usage": True}},
    {"model": "gpt-4", "messages": USER, "stream": False, "stream_options": {}},
    {"model": "gpt-4", "messages": USER, "stream": True, "stream_options": {"other": True}},
    {"model": "gpt-4", "messages": USER, "stop": ["a"] * 5},
    {"model": "gpt-4", "messages": USER, "logit_bias": {"1": 101}},
    {"model": "gpt-4", "messages": USER, "tool_choice": "sometimes"},
    {"model": "gpt-4", "messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]},
    {"model": "gpt-4", "messages": USER, "response_format": {"type": "xml"}},
    {"model": "gpt-4", "messages": USER, "modalities": 1},
    {"model": "gpt-4", "messages": USER, "functions": 7},
    {"model": "gpt-4", "messages": USER, "function_call": 3},
    {"model": "gpt-4", "messages": [{"role": "robot", "content": "x"}]},
    {"model": "gpt-4", "messages": [{"role": "user"}]},
    {"model": "gpt-4", "messages": [{"role": "user", "content": None}]},
    {"model": "gpt-4", "messages": [{"role": "user", "content": "x", "name": None}]},
    {"model": "gpt-4", "messages": [{"role": "assistant"}]},
    {"model": "gpt-4", "messages": [{"role": "assistant", "tool_calls": []}]},
    {"model": "gpt-4", "messages": [{"role": "assistant", "function_call": {}}]},
    {"model": "gpt-4", "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]},
    {"model": "gpt-4", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
    {"model": "gpt-4", "messages": [{"role": "tool", "content": "42"}]},
    {"model": "gpt-4", "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
]  # fmt: skip


@pytest.mark.parametrize("body", VALID)
def test_a_valid_request_passes_the_schema_and_the_gateway(body):
    config = Config.default()
    assert request_validator(openapi.document(config)).is_valid(body)
    assert gateway_accepts(config, body)


@pytest.mark.parametrize("body", INVALID)
def test_an_invalid_request_fails_the_schema_and_the_gateway(body):
    config = Config.default()
    assert not request_validator(openapi.document(config)).is_valid(body)
    assert not gateway_accepts(config, body)


def test_a_whole_float_is_an_integer_to_both():
    body = {"model": "gpt-4", "messages": USER, "max_tokens": 5.0}
    assert request_validator(openapi.document(Config.default())).is_valid(body)
    assert gateway_accepts(Config.default(), body)


@pytest.mark.parametrize("kind", [{}, []])
def test_an_unhashable_content_part_type_is_refused_by_both(kind):
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": kind}]}]}
    assert not request_validator(openapi.document(Config.default())).is_valid(body)
    assert not gateway_accepts(Config.default(), body)


def test_an_integer_past_64_bits_is_refused_by_both():
    raw = b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "seed": -9223372036854775809}'
    assert not request_validator(openapi.document(Config.default())).is_valid(json.loads(raw))
    assert not gateway_accepts(Config.default(), parse_body(raw))


# -- model names and steering keys, exhaustively -------------------------------------------

MODEL_TEXT = st.text(st.sampled_from("gpt-claude4*?[]!\\ \t\n\x1c\x85\u3000\u212a."), max_size=12)
MODEL_NAMES = MODEL_TEXT | st.text(max_size=12) | st.builds(str.__add__, st.sampled_from(["gpt-", "claude-"]), MODEL_TEXT)


@settings(max_examples=300, deadline=None)
@given(name=MODEL_NAMES)
def test_the_model_schema_accepts_exactly_the_routed_names(name):
    config = Config.default()
    body = {"model": name, "messages": USER}
    assert request_validator(openapi.document(config)).is_valid(body) == gateway_accepts(config, body)


@settings(max_examples=300, deadline=None)
@given(
    glob=st.text(st.sampled_from("ab-*?[]!^\\&~"), min_size=1, max_size=8),
    name=st.text(st.sampled_from("ab-]![^\\&~\n"), max_size=8),
)
def test_a_glob_route_becomes_the_pattern_fnmatch_would_match(glob, name):
    document = openapi.document(routes_config(glob))
    body = {"model": name, "messages": USER}
    routed = fnmatch.fnmatchcase(name, glob) or name == glob
    assert request_validator(document).is_valid(body) == (routed and bool(name.strip()) and "\n" not in name)


def test_exact_routes_are_an_enum():
    model = openapi.document(routes_config("gpt-4o", "claude-x"))["components"]["schemas"]["ChatCompletionRequest"]
    assert model["properties"]["model"]["enum"] == ["gpt-4o", "claude-x"]


def test_blank_means_what_pythons_strip_means():
    pattern = jsonschema_rs.Draft202012Validator({"type": "string", "pattern": openapi.NOT_BLANK})
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue  # no JSON text carries a lone surrogate to the gateway
        assert pattern.is_valid(char) == bool(char.strip()), hex(code)


def test_a_steering_key_is_refused_in_any_spelling_that_lowers_to_it():
    validator = request_validator(openapi.document(Config.default()))
    lowers_to_ascii = [chr(code) for code in range(sys.maxunicode + 1) if chr(code).lower().isascii()]
    for field in STEERING_FIELDS:
        for index, letter in enumerate(field):
            for char in (c for c in lowers_to_ascii if c.lower() == letter):
                key = field[:index] + char + field[index + 1 :]
                body = {"model": "gpt-4", "messages": USER, "metadata": {"deep": [{key: 1}]}}
                assert not validator.is_valid(body), key
                assert not gateway_accepts(Config.default(), body), key
