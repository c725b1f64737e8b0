"""Log records as one JSON object per line (or plain text for a person at a terminal), each carrying
the id of the HTTP request being served when there is one.

Django-free on purpose: settings.LOGGING is built here (`logging_config`), and the GPU worker's
publisher child, which imports neither Django nor torch, configures itself from the same function
(`logging_configure_from_env`).

JSON lines (python-json-logger) have `time` (ISO 8601, UTC), `level`, `logger`, `message`, then the
record's extras (`request_id`, and the fields a caller passes with `extra=`), and `exc_info` with
the traceback when there is one. Korean stays readable (no \\u escapes).

The request id lives in a context variable holding a small mutable `RequestContext`: asyncio tasks
and `sync_to_async` threads started while a request is served copy the variable, so they share the
same object, and a request that learns its generation's id later (`request_id_bind`) renames the
lines of all of them from then on.
"""

from __future__ import annotations

import logging
import logging.config
import os
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("json", "plain")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Attributes some libraries attach to records that must not become JSON fields: Django's
# `django.request` puts the HttpRequest (its repr shows the raw path) on its records.
_NOT_FIELDS = ("request", "color_message", "taskName")


@dataclass
class RequestContext:
    """What log lines emitted while serving one HTTP request share. `request_id`: 32 hex digits."""

    request_id: str


_current: ContextVar[RequestContext | None] = ContextVar("leafresh_request", default=None)


def request_context_start(request_id: str | None = None) -> tuple[RequestContext, Token[RequestContext | None]]:
    """Start a request's log context in the current context (a fresh uuid4 hex id unless given);
    the token ends it (`request_context_end`)."""
    context = RequestContext(request_id or uuid.uuid4().hex)
    return context, _current.set(context)


def request_context_end(token: Token[RequestContext | None]) -> None:
    """End a request's log context. From another context (a stream closed by the garbage collector
    in a task of its own) there is nothing to end: that context dies with its task."""
    try:
        _current.reset(token)
    except ValueError:
        pass


class DjangoRequestFilter(logging.Filter):
    """Keeps only `django.request` records with a traceback, without their path: the others ("Not
    Found: <path>") repeat what the request line says, and the raw path may hold a session id.
    Django formats these records as `"%s: %s" % (reason, path)` (django.utils.log.log_response)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            return False
        if isinstance(record.args, tuple) and record.args:
            record.msg, record.args = "%s (the request line names the endpoint)", (record.args[0],)
        return True


def request_id_current() -> str | None:
    """The id of the request being served here, or None outside a request."""
    context = _current.get()
    return context.request_id if context is not None else None


def request_id_bind(request_id: str) -> None:
    """Call the request being served by its generation's id (the `X-Request-ID` it answers with)
    from now on, in every task and thread serving it. Does nothing outside a request."""
    context = _current.get()
    if context is not None:
        context.request_id = request_id


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record emitted while a request is served (attach to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            context = _current.get()
            if context is not None:
                record.request_id = context.request_id
        return True


def json_formatter() -> JsonFormatter:
    """The JSON-lines formatter (`time`, `level`, `logger`, `message`, extras; Korean unescaped)."""
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        json_ensure_ascii=False,
        reserved_attrs=[*RESERVED_ATTRS, *_NOT_FIELDS],
    )


def plain_formatter() -> logging.Formatter:
    """One human-readable line per record, with the request id (`-` outside a request)."""
    return logging.Formatter(PLAIN_FORMAT, defaults={"request_id": "-"})


def logging_config(log_format: str, level: str, loggers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: one stderr handler in `log_format` ("json" or "plain")
    on the root logger at `level`, with the request-id filter, and `loggers` (per-logger levels).

    Raises ValueError for an unknown format.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"LEAFRESH_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": "leafresh.logs.json_formatter"},
            "plain": {"()": "leafresh.logs.plain_formatter"},
        },
        "filters": {
            "request_id": {"()": "leafresh.logs.RequestIdFilter"},
            "django_request": {"()": "leafresh.logs.DjangoRequestFilter"},
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": log_format, "filters": ["request_id"]},
        },
        "root": {"handlers": ["console"], "level": level},
        # Django's DEFAULT_LOGGING gives `django` and `django.server` plain handlers of their own
        # (console while DEBUG): naming them here removes those, so every record reaches the one above.
        "loggers": {
            "django": {"level": level},
            "django.server": {"level": level, "propagate": True},
            "django.request": {"filters": ["django_request"]},
            **(loggers or {}),
        },
    }


def logging_configure(config: dict[str, Any]) -> None:
    """Apply a `logging_config` dict (settings.LOGGING_CONFIG points here) and route Python warnings
    through logging (logger `py.warnings`), so that they come out in the same format."""
    logging.config.dictConfig(config)
    logging.captureWarnings(True)


def logging_configure_from_env() -> None:
    """Configure logging from LEAFRESH_LOG_FORMAT and LEAFRESH_LOG_LEVEL alone (for processes that
    do not load Django settings, such as the publisher child)."""
    log_format = os.environ.get("LEAFRESH_LOG_FORMAT", "json")
    logging_configure(logging_config(log_format, os.environ.get("LEAFRESH_LOG_LEVEL", "INFO")))
