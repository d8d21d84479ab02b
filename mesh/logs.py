"""One log format for every fleetlm process: readable text by default, one JSON object per line with
`--log-format json`. Every record written while a request is served carries its id (mesh.request_context)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from mesh.request_context import REQUEST_ID

FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON object.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "component"}
# Extras left out of the JSON object: uvicorn's `color_message`, its message again with ANSI colour codes.
_LEFT_OUT = {"color_message"}


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the component and the id of the request being served (or '')."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__(f"%(asctime)s {component:<12} %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{line} [request_id={request_id}]" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, component, logger, message, request_id when
    there is one, the fields passed with `extra=`, and the exception's traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "component": getattr(record, "component", ""),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _LEFT_OUT and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatted(component: str, level: int, logger: str, message: str, log_format: str = "text") -> str:
    """One line as `setup`'s handler writes it, for a process that prints among its children's log lines
    (`fleetlm up`'s supervisor) without logging itself."""
    record = logging.LogRecord(logger, level, __file__, 0, message, None, None)
    _RequestIdFilter(component).filter(record)
    return (JsonFormatter() if log_format == "json" else _TextFormatter(component)).format(record)


def setup(component: str, level: str = "INFO", log_format: str = "text") -> None:
    """Log to stderr with the component's name, so `fleetlm up`'s merged output stays readable."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter(component))
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TextFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python's warnings go through the same handler (with --log-format json a bare line would break it).
    logging.captureWarnings(True)
    # grpc and httpx are chatty at INFO about things operators do not need.
    for noisy in ("httpx", "aetcd"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
