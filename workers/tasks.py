"""One task: run a job row by id. Everything else is app.jobs.runner's."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

from app.jobs.celery_config import TASK_NAME
from app.jobs.context import TransientJobError
from app.settings import get_settings
from workers.celery_app import app

logger = logging.getLogger("app.jobs")
MAX_RETRIES = 5  # after transient errors; then the job fails with the last message
BACKOFF_FACTOR_S, BACKOFF_MAX_S = 2, 300


class JobTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
        # The hard time limit kills the child process, which cannot finish its own row: the parent
        # runs this hook, and marks the job failed.
        if isinstance(exc, TimeLimitExceeded) and args:
            from app.db.session import sync_sessions
            from app.jobs import store

            settings = get_settings()
            limit = settings.control.job_hard_time_limit_s
            store.fail_running(sync_sessions(settings), args[0],
                               f"the job ran past its hard time limit ({limit} s, MXEXT_JOB_HARD_TIME_LIMIT) and was killed")  # fmt: skip


# Retries are ours, not Celery's autoretry: two kinds share Celery's one counter (request.retries),
# and only one of them is limited. `waits` counts the re-checks of a duplicate delivery that found
# a live attempt holding the job; the rest of the retries followed transient errors.
@app.task(name=TASK_NAME, bind=True, base=JobTask, max_retries=None)
def run_job(self: Task, job_id: str, waits: int = 0) -> str:
    from app.jobs.runner import run_job as run

    settings = get_settings()
    transient = self.request.retries - waits
    try:
        outcome = run(job_id, settings, worker=self.request.hostname, can_retry=transient < MAX_RETRIES)
    except TransientJobError as exc:
        countdown = get_exponential_backoff_interval(BACKOFF_FACTOR_S, transient, BACKOFF_MAX_S, full_jitter=True)
        raise self.retry(exc=exc, countdown=countdown, args=[job_id], kwargs={"waits": waits}) from exc
    if outcome == "held":
        # Check again once the holder's heartbeat could have gone stale: then the job is finished
        # (nothing to do) or its worker is lost (this delivery takes it over).
        raise self.retry(countdown=settings.control.job_stale_after_s, args=[job_id], kwargs={"waits": waits + 1})
    return outcome
