"""Journey logging: one line per event of a request, each carrying its request id.

Lines are readable text by default::

    21:40:03.512 INFO  [req_5f1c2a9e0b7d4c11] attempt 1 to openai (gpt-4): server_error (500) after 0.003s

or JSON lines with ``--log-format json``, where the event's fields appear as keys::

    {"ts": "...", "level": "INFO", "request_id": "req_...", "event": "attempt_failed",
     "message": "attempt 1 to openai ...", "provider": "openai", "attempt": 1, ...}

Use :func:`event` rather than the logger directly, so both formats get the fields.
An event a request logs every time is guarded by :func:`enabled`, so that at WARNING
(the benchmark's level) its message is not even built.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter", "TextFormatter", "configure", "enabled", "event", "journey", "printable", "NO_REQUEST"]

journey = logging.getLogger("orchestrator.journey")
NO_REQUEST = "-"


def event(
    level: int,
    request_id: str,
    name: str,
    message: str,
    /,
    logger: logging.Logger = journey,
    **fields: Any,
) -> None:
    """Log one journey event ``name`` with a human ``message`` and structured ``fields``."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"request_id": request_id, "event": name, "fields": fields})


def enabled(level: int, logger: logging.Logger = journey) -> bool:
    """Whether :func:`event` logs at ``level`` to ``logger`` (a cached check: cheap)."""
    return logger.isEnabledFor(level)


class TextFormatter(logging.Formatter):
    """One line per record (a traceback, when there is one, follows it).

    Messages carry client input (model names, provider error messages): control and
    other non-printable characters in them are written escaped (``\\n``, ``\\x1b``,
    ``\\u202e``), so that no client can forge a line or hide one.
    """

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        request_id = getattr(record, "request_id", NO_REQUEST)
        line = f"{clock}.{int(record.msecs):03d} {record.levelname:<5} [{request_id}] {printable(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def printable(text: str) -> str:
    """``text`` with its non-printable characters escaped as Python would write them.

    Costs one scan in C when there are none, as in nearly every message.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", None),
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(*, log_format: str = "text", level: str | int = "INFO", stream: Any = None) -> None:
    """Send the gateway's logs to ``stream`` (stderr) in ``log_format`` ("text" or "json")."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # hypercorn's access log would duplicate our final-status line and costs time.
    logging.getLogger("hypercorn.access").disabled = True
    # httpx logs every upstream request at INFO; the journey's attempt lines say more.
    logging.getLogger("httpx").setLevel(logging.WARNING)
