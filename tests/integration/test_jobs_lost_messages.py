"""Postgres is the truth, Redis messages are hints: real `mxext worker` processes on a database and a
redis-server of this module's own. Messages lost in a Redis restart are published again by the
workers' sweeper; a duplicate message for a job a live worker runs leaves that attempt alone."""

from __future__ import annotations

import time
import uuid

import pytest

from app.db.models import Job, ModelArtifact
from app.db.session import sync_sessions
from app.jobs.celery_config import make_celery
from app.jobs.dispatch import publish
from app.jobs.sweeper import job_ids_in_broker
from tests.integration.jobs_support import WorkerProcess, count, job_settings, row, wait_row

# Short periods, so the test takes seconds (production: 10, 60 and 300 s).
FAST = {"MXEXT_JOB_HEARTBEAT": "0.3", "MXEXT_JOB_SWEEP_INTERVAL": "0.5", "MXEXT_JOB_REQUEUE_AFTER": "1"}


@pytest.fixture(scope="module")
def settings(new_postgres_database, redis_server, tmp_path_factory):
    # A database of its own: the sweeper publishes every old queued job it finds, other modules' too.
    return job_settings(tmp_path_factory.mktemp("lost-messages") / "store", new_postgres_database(), redis_server.url)


@pytest.fixture
def start_worker(settings, tmp_path):
    started: list[WorkerProcess] = []

    def start(name: str, concurrency: int = 1) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"{name}.log", name=name, concurrency=concurrency, extra_env=FAST)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


def queue_slow_jobs(settings, names: list[str], steps: int, step_s: float) -> list[str]:
    """test-slow rows, published as the server publishes them."""
    ids = [uuid.uuid4() for _ in names]
    with sync_sessions(settings).begin() as session:
        session.add_all(Job(id=job_id, kind="test-slow", status="queued", params={"name": name, "steps": steps, "step_s": step_s})
                        for job_id, name in zip(ids, names))  # fmt: skip
    celery = make_celery(settings)
    try:
        assert publish(celery, [str(i) for i in ids]) is None
    finally:
        celery.close()
    return [str(i) for i in ids]


def in_broker(settings) -> set[str]:
    celery = make_celery(settings)
    try:
        return job_ids_in_broker(celery)
    finally:
        celery.close()


def done_lines(settings, job_id: str) -> int:
    log = settings.store.home / "slow-kind.log"
    return log.read_text().splitlines().count(f"{job_id} done") if log.exists() else 0


def test_jobs_queued_across_a_redis_restart_run_exactly_once(settings, redis_server, start_worker):
    names = [f"restart-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    ids = queue_slow_jobs(settings, names, steps=4, step_s=0.2)  # the last one waits past MXEXT_JOB_REQUEUE_AFTER
    assert in_broker(settings) == set(ids)
    redis_server.kill()  # nothing on disk: every queued message is gone
    redis_server.start()
    assert in_broker(settings) == set()

    worker = start_worker("sweeper")  # concurrency 1: two of the three wait in Redis as a backlog
    jobs = [wait_row(settings, job_id, lambda j: j.status in ("succeeded", "failed", "cancelled"), timeout=30) for job_id in ids]
    assert [(j.status, j.attempts, j.error) for j in jobs] == [("succeeded", 1, None)] * 3
    assert [done_lines(settings, job_id) for job_id in ids] == [1, 1, 1]
    assert [count(settings, ModelArtifact, name=name) for name in names] == [1, 1, 1]
    log = worker.log()
    assert [log.count(f"job {job_id} re-published: queued for over") for job_id in ids] == [1, 1, 1], log


def test_a_duplicate_message_does_not_restart_a_running_job(settings, start_worker):
    worker = start_worker("dup", concurrency=2)  # a free slot takes the duplicate while the job runs
    name = f"dup-{uuid.uuid4().hex[:6]}"
    (job_id,) = queue_slow_jobs(settings, [name], steps=10, step_s=0.2)
    wait_row(settings, job_id, lambda j: j.status == "running" and j.progress >= 10)
    celery = make_celery(settings)
    try:
        assert publish(celery, [job_id]) is None  # the duplicate, as a second publish would make it
    finally:
        celery.close()

    job = wait_row(settings, job_id, lambda j: j.status in ("succeeded", "failed", "cancelled"), timeout=30)
    assert (job.status, job.attempts, job.error) == ("succeeded", 1, None)
    assert f"job {job_id}: attempt 1 on dup@" in worker.log() and "is alive" in worker.log()
    deadline = time.monotonic() + 10  # the duplicate's next check finds the job finished and ends
    while f"job {job_id}: already finished or unknown; nothing to do" not in worker.log():
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.1)
    assert (row(settings, job_id).attempts, done_lines(settings, job_id), count(settings, ModelArtifact, name=name)) == (1, 1, 1)
