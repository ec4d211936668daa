"""Helpers for the job tests: a server app on a FakeEngine with a real control plane (SQLite or
Postgres+Redis), a real Celery worker process, and small model folders to pull and build."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from app.db.models import Job
from app.db.session import sync_sessions
from app.settings import ControlPlaneSettings, Settings, StoreSettings
from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SLOW_KIND = "tests.integration.slow_job_kind:SLOW"
FINISHED = ("succeeded", "failed", "cancelled")


def job_settings(home: Path, database_url: str | None = None, redis_url: str | None = None, **control: Any) -> Settings:
    return Settings(store=StoreSettings(home=home),
                    control=ControlPlaneSettings(database_url=database_url, redis_url=redis_url, **control))  # fmt: skip


@contextlib.contextmanager
def job_server(settings: Settings, admin_key: str | None = None) -> Iterator[Any]:
    """A litestar TestClient on create_app(): the real lifespan (control plane and job runner) over a
    FakeEngine, so the job API answers through HTTP without loading a model."""
    from litestar.testing import TestClient

    from app.http.app import create_app
    from app.http.serve_cli import ServeConfig
    from app.http.testing import FakeEngine

    config = ServeConfig(model="fake", admin_key=admin_key)
    app = create_app(config, engine_factory=lambda _: FakeEngine(), settings=settings)
    with TestClient(app, timeout=30) as client:
        yield client


def wait_job(client: Any, job_id: str, statuses: tuple[str, ...] = FINISHED, timeout: float = 60.0,
             headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if body["status"] in statuses or time.monotonic() > deadline:
            assert body["status"] in statuses, body
            return body
        time.sleep(0.1)


def make_model_folder(folder: Path, *, hidden: int = 8, dtype: str = "bfloat16") -> Path:
    """A tiny HF-layout model (config.json + model.safetensors + a tokenizer file)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, hidden, generator=g).to(getattr(torch, dtype)),
        "model.norm.weight": torch.ones(hidden, dtype=getattr(torch, dtype)),
        "positions": torch.arange(4, dtype=torch.int64),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden, "torch_dtype": dtype}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


class WorkerProcess:
    """`python -m app.cli worker` against the test's Postgres and Redis, its output in a log file."""

    def __init__(self, settings: Settings, log_path: Path, *, name: str = "w1", visibility_timeout: int | None = None,
                 pool: str = "prefork", concurrency: int = 1, extra_env: dict[str, str] | None = None) -> None:  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATABASE_URL": settings.control.database_url or "",
               "REDIS_URL": settings.control.redis_url or "", "MXEXT_HOME": str(settings.store.home),
               "MXEXT_EXTRA_JOB_KINDS": SLOW_KIND, **(extra_env or {})}  # fmt: skip
        command = [sys.executable, "-m", "app.cli", "worker", "--pool", pool, "--concurrency", str(concurrency),
                   "--loglevel", "INFO", "--hostname", f"{name}@%h"]  # fmt: skip
        if visibility_timeout:
            command += ["--visibility-timeout", str(visibility_timeout)]
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children) at once: a lost machine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class RedisServer:
    """A redis-server of our own on a free port, nothing kept on disk (like the compose stack's), so
    a test can kill it and start it again: every message it held is gone."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.workdir)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def row(settings: Settings, job_id: Any) -> Job:
    """The job's row, read now."""
    with sync_sessions(settings)() as session:
        return session.get(Job, uuid.UUID(str(job_id)))


def wait_row(settings: Settings, job_id: Any, until: Callable[[Job], bool], timeout: float = 60.0) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = row(settings, job_id)
        if until(job) or time.monotonic() > deadline:
            assert until(job), (job.status, job.progress, job.attempts, job.error)
            return job
        time.sleep(0.1)


def count(settings: Settings, model: Any, **where: Any) -> int:
    with sync_sessions(settings)() as session:
        return session.execute(select(func.count()).select_from(model).filter_by(**where)).scalar_one()


def submit(client: Any, route: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(f"/v1/jobs/{route}", json=body, headers=headers)
