"""One settings object, read once from the environment (and an optional YAML file).

Everything else receives parts of it; the engine never reads the environment itself.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: use 1/0, true/false, yes/no or on/off")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    configure: bool = True
    config_path: str | None = None
    level: str = "INFO"
    jsonl: bool = False

    @classmethod
    def from_env(cls) -> LoggingSettings:
        return cls(
            configure=_env_bool("VLLM_MXEXT_CONFIGURE_LOGGING", True),
            config_path=os.environ.get("VLLM_MXEXT_LOGGING_CONFIG_PATH") or None,
            level=(os.environ.get("VLLM_MXEXT_LOG_LEVEL") or "INFO").upper(),
            jsonl=_env_bool("VLLM_MXEXT_JSONL_LOGGING", False),
        )


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    home: Path = Path("~/.cache/mxext").expanduser()

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @classmethod
    def from_env(cls) -> StoreSettings:
        return cls(home=Path(os.environ.get("MXEXT_HOME") or "~/.cache/mxext").expanduser())


@dataclasses.dataclass(frozen=True)
class Settings:
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    # The model served when none is named: MIM_MODEL_NAME (the seed's variable) or the default.
    model: str = DEFAULT_MODEL

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            logging=LoggingSettings.from_env(),
            store=StoreSettings.from_env(),
            model=os.environ.get("MIM_MODEL_NAME") or DEFAULT_MODEL,
        )


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings.from_env()
