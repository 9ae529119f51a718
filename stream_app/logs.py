"""Logging, configured once at the entry point: text or JSON lines.

JSON lines carry ``time``, ``level``, ``logger`` and ``message`` (and
``exception`` when there is one). Nothing the worker logs contains a secret:
settings are never logged whole (``stream-app config`` masks them).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

from stream_app import json
from stream_app.settings import LogFormat


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc).decode()


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The Kafka client's own INFO lines would drown the worker's.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
