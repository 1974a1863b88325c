"""Classification: one test per row of the tables, against DESIGN section 3 written out here."""

from __future__ import annotations

import httpx
import pytest

from orchestrator.messages import ErrorClass as C
from providers.pool import ResponseTooLarge
from providers.classify import (
    ERROR_CODE_CLASSES,
    EXCEPTION_CLASSES,
    MESSAGE_CLASSES,
    STATUS_CLASSES,
    classify_exception,
    classify_response,
    parse_retry_after,
)

# DESIGN section 3, restated independently of the module's tables.
EXPECTED_BY_STATUS = {
    400: C.CLIENT_ERROR, 401: C.MISCONFIGURED, 403: C.MISCONFIGURED, 404: C.MISCONFIGURED,
    408: C.TRANSIENT, 413: C.TOO_LONG, 422: C.CLIENT_ERROR, 429: C.RATE_LIMITED,
    500: C.SERVER_ERROR, 502: C.SERVER_ERROR, 503: C.SERVER_ERROR, 504: C.TRANSIENT, 529: C.SERVER_ERROR,
}
EXPECTED_BY_CODE = {
    "context_length_exceeded": C.TOO_LONG, "string_above_max_length": C.TOO_LONG, "request_too_large": C.TOO_LONG,
    "content_policy_violation": C.CLIENT_ERROR, "content_filter": C.CLIENT_ERROR,
    "invalid_api_key": C.MISCONFIGURED, "authentication_error": C.MISCONFIGURED,
    "permission_error": C.MISCONFIGURED, "model_not_found": C.MISCONFIGURED, "not_found_error": C.MISCONFIGURED,
}


@pytest.mark.parametrize("status", sorted(STATUS_CLASSES))
def test_status_rows(status):
    assert classify_response(status) is EXPECTED_BY_STATUS[status]


def test_every_design_status_is_in_the_table():
    assert set(EXPECTED_BY_STATUS) == set(STATUS_CLASSES)


@pytest.mark.parametrize("code", sorted(ERROR_CODE_CLASSES))
def test_code_rows(code):
    assert classify_response(400, code=code) is EXPECTED_BY_CODE[code]


@pytest.mark.parametrize("phrase, expected", MESSAGE_CLASSES)
def test_message_rows(phrase, expected):
    assert expected is C.TOO_LONG
    assert classify_response(400, message=f"Error: {phrase.upper()} for this model") is C.TOO_LONG


def test_codes_never_soften_server_errors_or_rate_limits():
    assert classify_response(500, code="invalid_api_key") is C.SERVER_ERROR
    assert classify_response(429, code="context_length_exceeded") is C.RATE_LIMITED


@pytest.mark.parametrize("status, expected", [(418, C.CLIENT_ERROR), (409, C.CLIENT_ERROR), (501, C.SERVER_ERROR),
                                              (599, C.SERVER_ERROR)])
def test_status_families(status, expected):
    assert classify_response(status) is expected


def _instance(exception_type):
    return exception_type("boom")


EXPECTED_BY_EXCEPTION = {
    httpx.ConnectTimeout: C.TRANSIENT, httpx.ConnectError: C.TRANSIENT, httpx.UnsupportedProtocol: C.MISCONFIGURED,
    httpx.InvalidURL: C.MISCONFIGURED, httpx.RemoteProtocolError: C.TRANSIENT, httpx.ReadError: C.TRANSIENT,
    httpx.WriteError: C.TRANSIENT, httpx.DecodingError: C.MALFORMED, httpx.TimeoutException: C.SILENT,
    httpx.TransportError: C.TRANSIENT, ResponseTooLarge: C.MALFORMED,
}


@pytest.mark.parametrize("exception_type", [row[0] for row in EXCEPTION_CLASSES])
def test_exception_rows(exception_type):
    error_class, description = classify_exception(_instance(exception_type))
    assert error_class is EXPECTED_BY_EXCEPTION[exception_type]
    assert description


def test_read_timeout_is_silence_and_unknown_errors_are_transient():
    assert classify_exception(httpx.ReadTimeout("slow"))[0] is C.SILENT
    assert classify_exception(RuntimeError("?"))[0] is C.TRANSIENT


def test_which_classes_count_against_the_provider():
    counted = {c for c in C if c.counts_against_provider}
    assert counted == {C.TRANSIENT, C.SILENT, C.SERVER_ERROR, C.MISCONFIGURED, C.MALFORMED}


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "99999"}, 3600.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
    ],
)
def test_retry_after(headers, expected):
    import email.utils

    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after(headers, now=now) == expected
