"""Log output of every devtrust command: plain text (default) or one JSON object per line.

``--log-format json`` on ``registrar``, ``hq`` and ``factory-station`` installs
:class:`JsonFormatter` through :func:`configure_logging`, the one place the three CLIs set
up logging. A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds, from the record),
``level``, ``logger``, ``message`` and, when the record carries them, ``exc`` (the
exception text, newlines kept inside the string so a line stays one record) and the
``extra=`` fields a caller passed. Journald, Loki or Elasticsearch ingest it as is.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from trustcore.errors import InvalidValueError

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "LogFormat", "configure_logging"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every ``LogRecord`` has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        return json.dumps(doc, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(
    level: str = "info", fmt: LogFormat = "text", stream: TextIO | None = None
) -> None:
    """Replace the root logger's handlers with one writing ``fmt`` to ``stream`` (stderr)."""
    if fmt not in LOG_FORMATS:
        raise InvalidValueError(f"unknown log format {fmt!r}")
    if level not in LOG_LEVELS:
        raise InvalidValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
