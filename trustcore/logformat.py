"""Log output of every devtrust command: plain text (default) or one JSON object per line.

``--log-format json`` on ``registrar``, ``hq`` and ``factory-station`` installs
:class:`JsonFormatter` through :func:`configure_logging`, the one place the three CLIs set
up logging. A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds, from the record),
``level``, ``logger``, ``message`` and, when the record carries them, ``exc`` (the
exception text, newlines kept inside the string so a line stays one record) and the
``extra=`` fields a caller passed. Journald, Loki or Elasticsearch ingest it as is.

In JSON mode the command's own diagnostics (``error: …``, ``REFUSED (…)``, ``warning: …``
written to stderr by click) become records too (logger ``<command>.stderr``): a log
shipper reading the service's stderr then never meets a line that is not JSON. Command
results on stdout are untouched (they are the command's output, not its log).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from trustcore.errors import InvalidValueError

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "LogFormat",
    "StderrAsRecords",
    "configure_logging",
]

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


def _line_level(line: str) -> int:
    head = line.lstrip().lower()
    if head.startswith(("error", "refused", "problem", "traceback")):
        return logging.ERROR
    if head.startswith("warning"):
        return logging.WARNING
    return logging.INFO


class StderrAsRecords(io.TextIOBase):
    """A text stream that turns each line written to it into a log record of ``logger``
    (level from the line's first word: ``error``/``refused``/``problem`` ERROR, ``warning``
    WARNING, else INFO). Installed as ``sys.stderr`` in JSON mode."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                self._logger.log(_line_level(line), "%s", line)
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            line, self._pending = self._pending, ""
            self._logger.log(_line_level(line), "%s", line)


def configure_logging(
    level: str = "info",
    fmt: LogFormat = "text",
    stream: TextIO | None = None,
    *,
    command: str | None = None,
) -> None:
    """Log ``fmt`` to ``stream`` (stderr) from ``level`` on. With ``fmt="json"`` and
    ``command``, ``sys.stderr`` is replaced by :class:`StderrAsRecords` for logger
    ``<command>.stderr`` (the handler keeps writing to the real stream)."""
    if fmt not in LOG_FORMATS:
        raise InvalidValueError(f"unknown log format {fmt!r}")
    if level not in LOG_LEVELS:
        raise InvalidValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    # Text: like logging.basicConfig, a no-op when the root logger has handlers already (a
    # test runner's, an embedding application's). JSON is an explicit choice: it replaces
    # them, so that no line on stderr is anything but JSON.
    logging.basicConfig(
        level=getattr(logging, level.upper()), handlers=[handler], force=fmt == "json"
    )
    if fmt == "json" and command is not None:
        sys.stderr = StderrAsRecords(logging.getLogger(f"{command}.stderr"))
