"""structlog, configured once per entry point: JSON lines in production, readable lines on a terminal.

Context (request_id, account_id, event_id, idempotency_key) is bound with structlog.contextvars by the
edge that knows it, so every line below carries it without being passed around.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys whose values must never reach a log line, whatever a caller binds.
SECRET_KEYS = frozenset({"authorization", "token", "secret", "signature", "stripe_signature", "api_key", "password"})


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event.keys() & SECRET_KEYS:
        event[key] = "[redacted]"
    return event


def _stderr_logger(*_args: Any) -> structlog.WriteLogger:
    """Write to whatever sys.stderr is now (it is swapped by test capture and daemon redirection), each line in
    one write: print() writes the line and its newline apart, and processes may share one stderr.
    (On a pipe, as under docker or Kubernetes, only writes up to 4 KiB never interleave: a line with a long
    traceback can still be split by another process's line.)"""
    return structlog.WriteLogger(sys.stderr)


def configure(fmt: str = "auto", level: int = logging.INFO) -> None:
    """Configure structlog (and route stdlib logging, e.g. uvicorn's, through the same output)."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")


def get(name: str | None = None) -> Any:
    """A structlog logger; `name` is bound as `logger`."""
    return structlog.get_logger(name) if name else structlog.get_logger()
