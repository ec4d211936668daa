"""One task: run a job row by id. Everything else is app.jobs.runner's."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import TimeLimitExceeded

from app.jobs.celery_config import TASK_NAME
from app.jobs.context import TransientJobError
from app.settings import get_settings
from workers.celery_app import app

logger = logging.getLogger("app.jobs")
MAX_RETRIES = 5


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


@app.task(
    name=TASK_NAME, bind=True, base=JobTask, autoretry_for=(TransientJobError,), retry_backoff=2,
    retry_backoff_max=300, retry_jitter=True, max_retries=MAX_RETRIES,
)  # fmt: skip
def run_job(self: Task, job_id: str) -> str:
    from app.jobs.runner import run_job as run

    return run(job_id, get_settings(), worker=self.request.hostname, can_retry=self.request.retries < MAX_RETRIES)
