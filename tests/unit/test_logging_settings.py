"""Settings from the environment and the VLLM_MXEXT_* logging configuration."""

from __future__ import annotations

import json
import logging

import pytest

from app.logging import configure_logging
from app.settings import LoggingSettings, Settings


def test_defaults(monkeypatch):
    for name in ("VLLM_MXEXT_CONFIGURE_LOGGING", "VLLM_MXEXT_LOG_LEVEL", "VLLM_MXEXT_JSONL_LOGGING",
                 "VLLM_MXEXT_LOGGING_CONFIG_PATH", "MIM_MODEL_NAME"):
        monkeypatch.delenv(name, raising=False)
    s = Settings.from_env()
    assert s.logging == LoggingSettings(configure=True, config_path=None, level="INFO", jsonl=False)
    assert s.model == "smollm2-135m-instruct"


def test_bad_boolean_says_what_to_use(monkeypatch):
    monkeypatch.setenv("VLLM_MXEXT_JSONL_LOGGING", "maybe")
    with pytest.raises(ValueError, match="VLLM_MXEXT_JSONL_LOGGING"):
        LoggingSettings.from_env()


def test_jsonl_lines_carry_extra_fields(monkeypatch, capsys):
    monkeypatch.setenv("VLLM_MXEXT_JSONL_LOGGING", "1")
    monkeypatch.setenv("VLLM_MXEXT_LOG_LEVEL", "debug")
    configure_logging(LoggingSettings.from_env())
    logging.getLogger("app.test").debug("served", extra={"request_id": "r1", "tokens_out": 7})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["message"] == "served" and entry["level"] == "DEBUG"
    assert entry["request_id"] == "r1" and entry["tokens_out"] == 7


def test_plain_lines_by_default(monkeypatch, capsys):
    monkeypatch.delenv("VLLM_MXEXT_JSONL_LOGGING", raising=False)
    monkeypatch.delenv("VLLM_MXEXT_LOG_LEVEL", raising=False)
    configure_logging(LoggingSettings.from_env())
    logging.getLogger("app.test").info("hello")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("INFO ") and line.endswith("[app.test] hello")


def test_configure_off_leaves_handlers_alone(monkeypatch):
    logger = logging.getLogger("app")
    before = list(logger.handlers)
    configure_logging(LoggingSettings(configure=False))
    assert logger.handlers == before


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="VLLM_MXEXT_LOGGING_CONFIG_PATH"):
        configure_logging(LoggingSettings(config_path=str(tmp_path / "nope.json")))
