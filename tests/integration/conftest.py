"""A real `mxext serve` (granian + Litestar + the AsyncEngine on SmolLM2) in a subprocess, per session."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m app.cli serve ...` on a free port, its output in a log file."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--model", str(model_dir), *args]  # fmt: skip
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=environ)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server: SmolLM2 with an API key, JSONL logs, a 1024-token context."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(
        smollm2_dir, log_path,
        "--served-model-name", "smollm2", "--api-key", API_KEY, "--max-model-len", "1024",
        "--num-kv-blocks", "512", "--max-request-body", "1MiB", "--shutdown-timeout", "5",
        env={"VLLM_MXEXT_JSONL_LOGGING": "1"},
    )  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server_process() -> type[ServerProcess]:
    """The ServerProcess class, for modules that need a server of their own."""
    return ServerProcess


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def http(server: ServerProcess, auth: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=auth, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(server: ServerProcess):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
