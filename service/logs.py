"""Log formats: readable text (the default) or one JSON object per line (LOG_FORMAT=json).

For the service's logger and gunicorn's alike; every line logged while serving a request carries its ID
(service/request_context.py).

The access log is the service's own (``convserve.access``, one line per request, written by the HTTP layer and the
gRPC server), not gunicorn's: it carries the request ID, the model version, the stage timings and the shed reason.
Light on purpose: the gunicorn master imports it.
"""

from __future__ import annotations

import logging
import sys
import time

from service.request_context import RequestIdFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
JSON_FIELDS = ["levelname", "name", "process", "message", "request_id"]
JSON_RENAMED = {"levelname": "level", "name": "logger", "process": "pid"}
ACCESS_LOGGER = "convserve.access"
_structured = [False]  # set by configure()


def structured() -> bool:
    """Whether lines are JSON objects (LOG_FORMAT=json), whose members a call's ``extra`` fields become. The text
    format shows the message and the request ID alone, so the access line gathers its fields only for JSON."""
    return _structured[0]


class TextFormatter(logging.Formatter):
    """The text format, with `` request_id=...`` after the message of a line logged for a request (before any
    traceback, so the ID stays on the line that says what happened)."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)
        self._second = (None, "")  # the last whole second formatted, and its text: one strftime a second

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, self.converter(record.created)))
        return self.default_msec_format % (cached[1], record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} request_id={request_id}" if request_id else line


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time, level, logger, pid, message, request_id, and whatever the call's ``extra``
    adds (the access line's method, path, status, model, version, stages_ms, ...)."""
    from pythonjsonlogger.json import JsonFormatter

    # "time": ISO 8601 in UTC, what log stacks parse without a pattern
    return JsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMED, timestamp="time", json_ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    return json_formatter() if log_format == "json" else TextFormatter()


def configure(level: str, log_format: str) -> None:
    """The service's logger ("convserve" and its children) to stdout, in the chosen format."""
    # Neither format shows a line's thread, multiprocessing name or source line: not collected, a sixth of each
    # record's cost (the logging HOWTO's "Optimization" names these switches).
    logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    logger = logging.getLogger("convserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.addFilter(RequestIdFilter())
        logger.addHandler(handler)
        logger.propagate = False
    for handler in logger.handlers:
        handler.setFormatter(formatter(log_format))
    _structured[0] = log_format == "json"
    logger.setLevel(level.upper())


def gunicorn_logconfig(log_format: str, level: str) -> dict | None:
    """gunicorn's logconfig_dict for JSON lines (its own "Booting worker" lines too); None keeps its text format."""
    if log_format != "json":
        return None
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": "service.logs.json_formatter"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "loggers": {"gunicorn.error": {"level": level.upper(), "handlers": ["console"], "propagate": False}},
        "root": {"level": level.upper(), "handlers": ["console"]},
    }
