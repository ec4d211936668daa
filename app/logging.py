"""Logging configured from VLLM_MXEXT_* variables: plain lines by default, JSONL on request."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import logging.config
import sys
from pathlib import Path

from app.settings import LoggingSettings

# Attributes every LogRecord has; anything else was passed through `extra=` and belongs in the JSON.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonlFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


PLAIN_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"


def configure_logging(settings: LoggingSettings) -> None:
    """Apply the logging settings to the `app` logger tree (idempotent)."""
    if not settings.configure:
        return
    if settings.config_path:
        path = Path(settings.config_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VLLM_MXEXT_LOGGING_CONFIG_PATH={path}: no such file; point it at a JSON dictConfig"
            )
        logging.config.dictConfig(json.loads(path.read_text()))
        return
    if settings.level not in logging.getLevelNamesMapping():
        raise ValueError(f"VLLM_MXEXT_LOG_LEVEL={settings.level!r}: use DEBUG, INFO, WARNING or ERROR")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonlFormatter() if settings.jsonl else logging.Formatter(PLAIN_FORMAT))
    for name in ("app", "workers", "bench"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(settings.level)
        logger.propagate = False
