"""Logging set-up: one line per event, as text or as JSON objects (`--log-format json`).

Task lifecycle lines carry `task_id` as a field (JSON) or in the message (text); access
log lines carry the path, which holds the task id for /tasks/<id>. Nothing logs request
headers, so API keys never reach a log; URLs with credentials are refused before any use.
"""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import HttpProcessingError
from pythonjsonlogger.json import JsonFormatter

_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


class MalformedRequests(logging.Filter):
    """aiohttp logs each request its parser refuses (a header line over 8 KiB, a bad chunk
    size) as an error with a traceback. It is the client's mistake, answered with a 400: one
    warning line says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError):
            reason = str(exc.message).strip().splitlines()[0] if exc.message else str(exc.code)
            record.msg, record.args = "%s: %s", (record.getMessage(), reason)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(MalformedRequests())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(_FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
