"""The compose stack cannot run here (no Docker engine), so check what can go stale without it:
every command it runs is a real `mxext` subcommand, every path the Dockerfile copies exists, and
the services agree on the URLs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())


def _services() -> dict:
    return COMPOSE["services"]


@pytest.mark.parametrize("service", ["migrate", "worker"])
def test_commands_are_real_subcommands(service, capsys):
    command = _services()[service]["command"]
    assert command[0] == "mxext"
    with pytest.raises(SystemExit) as exit_info:  # --help of the exact subcommand: parses or fails
        main([*command[1:3], "--help"] if command[1] == "db" else [command[1], "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_dockerfile_copies_existing_paths():
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert re.search(r"torch==\d", dockerfile), "torch must be pinned (an unpinned torch pulls a CUDA build)"


def test_services_share_the_database_and_broker():
    env = COMPOSE["x-mxext"]["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:6379/")
    for name in ("migrate", "server", "worker"):
        assert _services()[name]["environment"] == env  # the YAML anchor: one configuration for all
    prometheus = (ROOT / "compose" / "prometheus.yml").read_text()
    assert "server:8000" in prometheus and "/metrics" in prometheus
