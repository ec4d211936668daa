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


def _env_positive(name: str, default: int) -> int:
    value = _env_int(name, default)
    if value < 1:
        raise ValueError(f"{name}={value}: must be at least 1")
    return value


def _env_roots(name: str) -> tuple[Path, ...]:
    raw = os.environ.get(name) or ""
    return tuple(Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip())


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA serving limits and switches. Precedence: flags > environment > LoRA config file > defaults."""

    max_gpu_loras: int = 8  # adapters resident on the device at once -> EngineConfig.max_loras
    max_cpu_loras: int = 16  # adapters kept in host memory -> EngineConfig.max_cpu_loras
    max_lora_rank: int = 32  # -> EngineConfig.max_lora_rank
    allow_runtime_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    admin_key: str | None = None  # when set, the runtime-updating routes need it
    roots: tuple[Path, ...] = ()  # extra folders adapters may be loaded from (added to the store's)

    def __post_init__(self) -> None:
        for name in ("max_gpu_loras", "max_cpu_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, base: LoraSettings | None = None) -> LoraSettings:
        """The environment's values over `base` (the LoRA config file's, else the defaults)."""
        base = base or cls()
        # VLLM_MAX_LORAS (vLLM's name) is an alias; MIM_MAX_GPU_LORAS wins when both are set.
        gpu_var = "MIM_MAX_GPU_LORAS" if os.environ.get("MIM_MAX_GPU_LORAS", "").strip() else "VLLM_MAX_LORAS"
        return cls(
            max_gpu_loras=_env_positive(gpu_var, base.max_gpu_loras),
            max_cpu_loras=_env_positive("MIM_MAX_CPU_LORAS", base.max_cpu_loras),
            max_lora_rank=_env_positive("VLLM_MAX_LORA_RANK", base.max_lora_rank),
            allow_runtime_updating=_env_bool("VLLM_ALLOW_RUNTIME_LORA_UPDATING", base.allow_runtime_updating),
            admin_key=os.environ.get("VLLM_MXEXT_ADMIN_KEY") or base.admin_key,
            roots=tuple(dict.fromkeys((*base.roots, *_env_roots("VLLM_MXEXT_LORA_ROOTS")))),
        )


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """An S3-compatible object store (MinIO, AWS) for `s3://bucket/prefix` model pulls."""

    endpoint: str | None = None  # host:port or a URL; None -> AWS (s3.amazonaws.com)
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool | None = None  # None: from the endpoint's scheme (http:// -> False), else True
    region: str | None = None

    @classmethod
    def from_env(cls) -> S3Settings:
        raw_secure = os.environ.get("MXEXT_S3_SECURE")
        return cls(
            endpoint=os.environ.get("MXEXT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None,
            access_key=os.environ.get("MXEXT_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=os.environ.get("MXEXT_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            secure=None if not (raw_secure or "").strip() else _env_bool("MXEXT_S3_SECURE", True),
            region=os.environ.get("MXEXT_S3_REGION") or os.environ.get("AWS_REGION") or None,
        )


# A running job whose row has gone this many heartbeats without a write has lost its worker.
JOB_STALE_HEARTBEATS = 3


@dataclasses.dataclass(frozen=True)
class ControlPlaneSettings:
    """Job state, workers and signalling. With neither URL set, everything runs embedded: SQLite in
    the store and in-process jobs and signals (the `make serve` default)."""

    database_url: str | None = None  # DATABASE_URL: postgresql://user@host/db, sqlite:///file, ...
    redis_url: str | None = None  # REDIS_URL: redis://host:port/db (Celery broker + hints)
    reconcile_interval_s: float = 30.0  # MXEXT_RECONCILE_INTERVAL: adapter reconcile timer
    job_soft_time_limit_s: int = 3600  # MXEXT_JOB_SOFT_TIME_LIMIT: the task is asked to stop
    job_hard_time_limit_s: int = 3900  # MXEXT_JOB_HARD_TIME_LIMIT: the worker child is killed
    replica_id: str | None = None  # MXEXT_REPLICA_ID: this server's name in the fleet (default host:port)
    # MXEXT_SIGNAL_CHANNEL: the Redis pub/sub channel of adapter hints. Channels span Redis db
    # indexes, so deployments (or test runs) sharing one Redis need channels of their own.
    signal_channel: str = "mxext:signals"
    # MXEXT_DB_POOL_SIZE: Postgres connections each server keeps for the API. Concurrent
    # submissions and reads share statements (app.jobs.coalesce), so a burst of 50 needs few.
    db_pool_size: int = 10
    # MXEXT_VISIBILITY_TIMEOUT: redelivery delay after a lost worker (default: hard limit + 10 min)
    visibility_timeout_override_s: int | None = None
    # MXEXT_JOB_HEARTBEAT: a running attempt refreshes its row's updated_at this often. A claim takes
    # a running job only once that is JOB_STALE_HEARTBEATS heartbeats old (its worker is lost).
    job_heartbeat_s: float = 10.0
    # MXEXT_JOB_SWEEP_INTERVAL: how often each worker looks for jobs whose message was lost
    job_sweep_interval_s: float = 60.0
    # MXEXT_JOB_REQUEUE_AFTER: a job queued this long whose message is not in Redis is published again
    job_requeue_after_s: float = 300.0
    s3: S3Settings = dataclasses.field(default_factory=S3Settings)

    def __post_init__(self) -> None:
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("MXEXT_JOB_HARD_TIME_LIMIT must be larger than MXEXT_JOB_SOFT_TIME_LIMIT")
        if self.reconcile_interval_s <= 0:
            raise ValueError("MXEXT_RECONCILE_INTERVAL must be positive")
        for name, value in (("MXEXT_JOB_HEARTBEAT", self.job_heartbeat_s),
                            ("MXEXT_JOB_SWEEP_INTERVAL", self.job_sweep_interval_s),
                            ("MXEXT_JOB_REQUEUE_AFTER", self.job_requeue_after_s)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"{name}={value}: must be a positive number of seconds")
        # A lost worker's task comes back after the visibility timeout; the redelivery should find
        # the dead attempt's heartbeat stale by then and take the job at once, not wait for it.
        if self.job_stale_after_s > self.visibility_timeout_s / 2:
            raise ValueError(
                f"MXEXT_JOB_HEARTBEAT={self.job_heartbeat_s:g} is too long for a visibility timeout of "
                f"{self.visibility_timeout_s} s: a running job counts as lost after {JOB_STALE_HEARTBEATS} "
                "heartbeats without news, which must be at most half the visibility timeout "
                f"(MXEXT_VISIBILITY_TIMEOUT); use a heartbeat of at most {self.visibility_timeout_s / 6:g} s"
            )

    @property
    def job_stale_after_s(self) -> float:
        """A running job whose row is older than this has lost its worker."""
        return JOB_STALE_HEARTBEATS * self.job_heartbeat_s

    @property
    def visibility_timeout_s(self) -> int:
        # Redis redelivers an unacknowledged task after this long: longer than the longest job, or a
        # slow job would run twice at once (an override is for tests and short-job deployments).
        return self.visibility_timeout_override_s or self.job_hard_time_limit_s + 600

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @classmethod
    def from_env(cls) -> ControlPlaneSettings:
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            redis_url=os.environ.get("REDIS_URL") or None,
            reconcile_interval_s=_env_float("MXEXT_RECONCILE_INTERVAL", 30.0),
            job_soft_time_limit_s=_env_positive("MXEXT_JOB_SOFT_TIME_LIMIT", 3600),
            job_hard_time_limit_s=_env_positive("MXEXT_JOB_HARD_TIME_LIMIT", 3900),
            replica_id=os.environ.get("MXEXT_REPLICA_ID") or None,
            signal_channel=(os.environ.get("MXEXT_SIGNAL_CHANNEL") or "").strip() or "mxext:signals",
            db_pool_size=_env_positive("MXEXT_DB_POOL_SIZE", 10),
            visibility_timeout_override_s=_env_positive("MXEXT_VISIBILITY_TIMEOUT", 1)
            if (os.environ.get("MXEXT_VISIBILITY_TIMEOUT") or "").strip() else None,
            job_heartbeat_s=_env_float("MXEXT_JOB_HEARTBEAT", 10.0),
            job_sweep_interval_s=_env_float("MXEXT_JOB_SWEEP_INTERVAL", 60.0),
            job_requeue_after_s=_env_float("MXEXT_JOB_REQUEUE_AFTER", 300.0),
            s3=S3Settings.from_env(),
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    control: ControlPlaneSettings = dataclasses.field(default_factory=ControlPlaneSettings)
    # The model served when none is named: MIM_MODEL_NAME (the seed's variable) or the default.
    model: str = DEFAULT_MODEL

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            logging=LoggingSettings.from_env(),
            store=StoreSettings.from_env(),
            lora=LoraSettings.from_env(),
            control=ControlPlaneSettings.from_env(),
            model=os.environ.get("MIM_MODEL_NAME") or DEFAULT_MODEL,
        )


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings.from_env()
