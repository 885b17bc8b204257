"""Log lines: one JSON object per line for a log pipeline, or text for a person at a terminal.

Every line of the process goes through one handler on the root logger, uvicorn's included (the CLI
tells uvicorn to leave logging alone). A record may carry structured ``fields`` (the access line of
:mod:`gateway.observe` does): in JSON they are the line's keys, in text ``name=value`` pairs.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import msgspec

from gateway.settings import LoggingSettings

__all__ = ["JsonFormatter", "TextFormatter", "configure"]

_encoder = msgspec.json.Encoder(enc_hook=str)


_second: tuple[int, str] = (-1, "")
"""The last whole second formatted, and its text: most lines share it with the line before. One
tuple, swapped whole, so a thread that logs meanwhile never reads half of it."""


def _timestamp(record: logging.LogRecord) -> str:
    global _second
    second, text = _second
    if int(record.created) != second:
        second = int(record.created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, text)
    return f"{text}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg"}`` (plus ``request_id`` and ``exc`` when there are any); a
    record with ``fields`` is ``{"ts", "level", "msg", **fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower()}
        fields = getattr(record, "fields", None)
        if fields is None:
            line["logger"] = record.name
            line["msg"] = record.getMessage()
            request_id = getattr(record, "request_id", None)
            if request_id:
                line["request_id"] = request_id
        else:
            line["msg"] = record.getMessage()
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _encoder.encode(line).decode()


class TextFormatter(logging.Formatter):
    """The classic line, with a record's ``fields`` after the message as ``name=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            pairs = (f"{name}={_text(value)}" for name, value in fields.items() if value is not None and value != "")
            line = f"{line} {' '.join(pairs)}"
        return line


def _text(value: object) -> str:
    text = str(value)
    # A value a client chose (a user id) must not split the line or fake another pair.
    return _encoder.encode(text).decode() if not text or any(c in text for c in ' ="\n\r\t') else text


def configure(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    """Send every logger's lines to ``stream`` (stderr), formatted as ``settings.format`` says."""
    stream = stream if stream is not None else sys.stderr
    style = settings.format
    if style == "auto":
        style = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if style == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # uvicorn's loggers send to the root handler; its access log stays off (the gateway writes its own).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # httpx logs every upstream request at INFO: a line per request is the access log's job.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    # Neither format shows where a line was logged from, nor the thread or process: skip looking them
    # up for every record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
