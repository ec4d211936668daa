"""Real `mxext worker` processes on this machine's Postgres and Redis: a worker killed mid-job, a
cancel of a running job, a LoRA conversion that registers the adapter, and a benchmark job
against a real server."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.models import BenchmarkRun, Job, LoraAdapter, ModelArtifact
from app.db.session import sync_sessions
from app.jobs.celery_config import TASK_NAME, make_celery
from tests.integration.jobs_support import WorkerProcess, count, job_server, job_settings, row, submit, wait_job, wait_row
from tests.lora_folders import make_gqa_lora

VISIBILITY_S = 3  # a lost worker's task comes back after this long (production: hard limit + 600 s)
HEARTBEAT_S = 0.5  # a running attempt's heartbeat: stale (its worker lost) after 3 of them, 1.5 s


@pytest.fixture(scope="module")
def settings(postgres_url, redis_url, tmp_path_factory):
    return job_settings(tmp_path_factory.mktemp("jobs-worker") / "store", postgres_url, redis_url)


@pytest.fixture
def worker_factory(settings, tmp_path):
    started: list[WorkerProcess] = []

    def start(name: str) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"{name}.log", name=name, visibility_timeout=VISIBILITY_S,
                               extra_env={"VLLM_MXEXT_LORA_ROOTS": str(tmp_path),
                                          "MXEXT_JOB_HEARTBEAT": str(HEARTBEAT_S)})  # fmt: skip
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


def enqueue_slow(settings, name: str, steps: int, step_s: float) -> str:
    """A test-slow job row plus its task (the kind has no REST route)."""
    job_id = uuid.uuid4()
    with sync_sessions(settings).begin() as session:
        session.add(Job(id=job_id, kind="test-slow", status="queued", params={"name": name, "steps": steps, "step_s": step_s}))
    send(settings, job_id)
    return str(job_id)


def send(settings, job_id) -> None:
    celery = make_celery(settings)
    celery.send_task(TASK_NAME, args=[str(job_id)])
    celery.close()


def test_sigkill_mid_job_completes_exactly_once_on_another_worker(settings, worker_factory):
    name = f"slow-{uuid.uuid4().hex[:6]}"
    first = worker_factory("first")
    job_id = enqueue_slow(settings, name, steps=12, step_s=0.25)
    wait_row(settings, job_id, lambda j: j.status == "running" and j.progress >= 25)
    first.kill()  # main process and pool child at once, mid-job: its task stays unacknowledged
    staging = list(settings.store.models_dir.glob(f".staging-{name}-*"))
    assert staging and not (settings.store.models_dir / name).exists()  # half-written, never visible

    # Sweeps the lost task back after VISIBILITY_S and runs it again once the dead attempt's
    # heartbeat is stale.
    worker_factory("second")
    job = wait_row(settings, job_id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert (job.status, job.attempts, job.error) == ("succeeded", 2, None)
    assert job.worker.startswith("second@")
    log = (settings.store.home / "slow-kind.log").read_text().splitlines()
    assert log.count(f"{job_id} done") == 1
    assert count(settings, ModelArtifact, name=name) == 1
    assert sorted(p.name for p in (settings.store.models_dir / name).iterdir()) == sorted(f"part-{i}.bin" for i in range(12))
    assert not list(settings.store.models_dir.glob(f".staging-{name}-*"))

    send(settings, job_id)  # a late duplicate delivery of the finished job does nothing
    time.sleep(1.5)
    job = row(settings, job_id)
    assert (job.status, job.attempts) == ("succeeded", 2)
    assert (settings.store.home / "slow-kind.log").read_text().splitlines().count(f"{job_id} done") == 1


def test_cancel_a_running_job(settings, worker_factory):
    worker_factory("canceller")
    name = f"cancel-{uuid.uuid4().hex[:6]}"
    job_id = enqueue_slow(settings, name, steps=40, step_s=0.2)
    wait_row(settings, job_id, lambda j: j.status == "running" and j.progress > 5)
    with job_server(settings) as client:
        flagged = client.post(f"/v1/jobs/{job_id}/cancel")
        assert flagged.status_code == 200 and flagged.json()["cancel_requested"] is True
        job = wait_job(client, job_id, timeout=20)
    assert job["status"] == "cancelled" and job["error"] == "cancelled on request" and job["progress"] < 100
    assert not (settings.store.models_dir / name).exists()
    assert not list(settings.store.models_dir.glob(f".staging-{name}-*"))
    assert count(settings, ModelArtifact, name=name) == 0


def test_lora_conversion_peft_to_nemo_and_back_registers_the_adapter(settings, worker_factory, tmp_path):
    pytest.importorskip("app.adapters.registry")
    worker_factory("converter")
    source, base = make_gqa_lora(tmp_path)
    name = f"conv-{uuid.uuid4().hex[:6]}"
    to_nemo = {"source": str(source), "name": f"{name}-nemo", "to_format": "nemo", "base_model": str(base)}
    with job_server(settings) as client:
        refused = submit(client, "lora-conversions", {**to_nemo, "register": True})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "register"
        nemo = wait_job(client, submit(client, "lora-conversions", to_nemo).json()["id"])
        assert nemo["status"] == "succeeded", nemo
        assert nemo["result"]["format"] == "nemo" and Path(nemo["result"]["path"]).exists()
        back = {"source": nemo["result"]["path"], "name": name, "to_format": "peft", "register": True, "base_model": str(base)}
        job = wait_job(client, submit(client, "lora-conversions", back).json()["id"])
        assert job["status"] == "succeeded", job
        bad = wait_job(client, submit(client, "lora-conversions", {**back, "name": f"{name}-x", "source": str(base)}).json()["id"])
    assert bad["status"] == "failed" and bad["error"]
    with sync_sessions(settings)() as session:
        adapter = session.execute(select(LoraAdapter).where(LoraAdapter.name == name)).scalar_one()
    assert (adapter.desired, adapter.path, adapter.job_id) == (True, job["result"]["path"], uuid.UUID(job["id"]))
    assert count(settings, LoraAdapter, name=f"{name}-nemo") == 0 and count(settings, LoraAdapter, name=f"{name}-x") == 0
    assert not (settings.store.adapters_dir / f"{name}-x").exists()


def test_benchmark_job_against_a_real_server(settings, worker_factory, server):
    worker_factory("bencher")
    config = {
        "server": {"url": server.base_url, "model": "smollm2", "api_key": "test-key", "endpoint": "completions"},
        "test_params": {"num_prompts": 3, "max_tokens": 8, "ignore_eos": True, "concurrent_requests": 1, "temperature": 0},
        "output": {"plot": False},
    }
    with job_server(settings) as client:
        job = wait_job(client, submit(client, "benchmarks", {"config": config, "name": "smoke"}).json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    aggregate = job["result"]["aggregate"]
    assert job["result"]["exit_code"] == 0 and Path(job["result"]["log_file"]).is_file()
    with sync_sessions(settings)() as session:
        run = session.execute(select(BenchmarkRun).where(BenchmarkRun.job_id == uuid.UUID(job["id"]))).scalar_one()
    assert (run.name, run.target, run.model, run.status) == ("smoke", server.base_url, "smollm2", "succeeded")
    assert run.results == aggregate and json.dumps(aggregate)

