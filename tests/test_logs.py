"""Journey log lines: readable text with the request id, or JSON with the event's fields."""

from __future__ import annotations

import io
import logging

import orjson

from orchestrator.logs import configure, event


def capture(log_format: str, message: str = "backoff: waiting 2.31s before attempt 2 to openai") -> str:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    configure(log_format=log_format, level="INFO", stream=stream)
    try:
        event(logging.INFO, "req_abc", "backoff", message, provider="openai", wait_seconds=2.31)
        event(logging.DEBUG, "req_abc", "noise", "not shown at INFO")
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    return stream.getvalue()


def test_text_lines_carry_the_request_id():
    [line] = capture("text").splitlines()
    assert "INFO" in line and "[req_abc] backoff: waiting 2.31s before attempt 2 to openai" in line


def test_json_lines_carry_the_fields():
    [line] = capture("json").splitlines()
    entry = orjson.loads(line)
    assert entry["request_id"] == "req_abc" and entry["event"] == "backoff"
    assert entry["provider"] == "openai" and entry["wait_seconds"] == 2.31
    assert entry["level"] == "INFO" and entry["message"].startswith("backoff:")
    assert entry["ts"].endswith("Z")


def test_text_lines_escape_what_could_forge_or_hide_a_line():
    # Messages quote client input (a provider's error message, a model name).
    forged = "oops\r\n19:00:00.000 INFO  [req_fake] forged\x00\x1b[2K\x85\u2028\u202e é"
    [line] = capture("text", forged).splitlines()
    assert line.endswith("oops\\r\\n19:00:00.000 INFO  [req_fake] forged\\x00\\x1b[2K\\x85\\u2028\\u202e é")
