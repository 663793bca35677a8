"""Logging set-up: one line per event, as text or as JSON objects (`--log-format json`).

Task lifecycle lines carry `task_id` as a field (JSON) or in the message (text); access
log lines carry the path, which holds the task id for /tasks/<id>. Nothing logs request
headers, so API keys never reach a log; URLs with credentials are refused before any use.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(_FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
