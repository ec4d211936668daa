"""How the server hands a new job to whatever runs it.

* REDIS_URL set: Celery (`send_task("mxext.run_job", [id])`); `mxext worker` processes consume it.
* No REDIS_URL (embedded, `make serve`): a small thread pool in the server process runs the same
  `run_job`. On start-up it re-queues jobs a previous process left queued or running, and on
  shutdown a running job is handed back to the queue (it runs again at the next start).

Both are ControlPlane services (async start/stop) with `async submit(job_id)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid

from app.db.session import sync_sessions
from app.jobs.context import TransientJobError
from app.settings import Settings

logger = logging.getLogger("app.jobs")


class EnqueueError(RuntimeError):
    """The job could not be handed to a worker (the broker is unreachable)."""


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._celery = None

    async def start(self) -> None:
        from app.jobs.celery_config import make_celery

        self._celery = make_celery(self.settings)

    async def stop(self) -> None:
        if self._celery is not None:
            await asyncio.to_thread(self._celery.close)

    async def submit(self, job_id: uuid.UUID) -> None:
        from app.jobs.celery_config import TASK_NAME

        if self._celery is None:
            raise EnqueueError("the job dispatcher has not started")
        try:
            # ignore_result: the row in the database is the job's state, nobody waits on Celery's
            # AsyncResult; without it every send subscribes to the task's result channel first.
            await asyncio.to_thread(self._celery.send_task, TASK_NAME, args=[str(job_id)], ignore_result=True)
        except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
            raise EnqueueError(f"could not enqueue the job on Redis ({type(exc).__name__}: {exc})") from exc


class EmbeddedRunner:
    """Jobs in threads of the server process (SQLite or Postgres, no Redis)."""

    def __init__(self, settings: Settings, threads: int = 2, max_retries: int = 3, backoff_s: float = 2.0) -> None:
        self.settings = settings
        self.threads = max(1, min(2, threads))
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.worker = f"embedded:{threading.get_native_id()}"
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: set[concurrent.futures.Future[None]] = set()
        self._stopping = threading.Event()

    async def start(self) -> None:
        from app.jobs import store
        from app.jobs.runner import default_worker_name

        self.worker = f"embedded@{default_worker_name()}"
        self._stopping.clear()
        self._executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="mxext-job")
        left = await asyncio.to_thread(store.unfinished_ids, sync_sessions(self.settings))
        if left:
            logger.info("re-queueing %d job(s) left by a previous process", len(left))
        for job_id in left:
            self._submit(job_id)

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._executor is None:
            return
        self._executor.shutdown(wait=False, cancel_futures=True)
        pending = [f for f in self._futures if not f.done()]
        if pending:
            await asyncio.to_thread(concurrent.futures.wait, pending, timeout)
        self._executor = None

    async def submit(self, job_id: uuid.UUID) -> None:
        if self._executor is None:
            raise EnqueueError("the embedded job runner is not running")
        self._submit(job_id)

    def _submit(self, job_id: uuid.UUID) -> None:
        assert self._executor is not None
        future = self._executor.submit(self._run, job_id)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def _run(self, job_id: uuid.UUID) -> None:
        from app.jobs.runner import run_job

        for retry in range(self.max_retries + 1):
            if self._stopping.is_set():
                return
            try:
                run_job(job_id, self.settings, worker=self.worker, can_retry=retry < self.max_retries,
                        stopping=self._stopping.is_set)  # fmt: skip
                return
            except TransientJobError:
                if self._stopping.wait(self.backoff_s * 2**retry):
                    return
            except Exception:  # noqa: BLE001 - the thread must survive; the row says what happened
                logger.exception("embedded job %s crashed", job_id)
                return


def make_dispatcher(settings: Settings) -> CeleryDispatcher | EmbeddedRunner:
    """Celery when REDIS_URL is set, else the embedded runner."""
    return EmbeddedRunner(settings) if settings.control.embedded else CeleryDispatcher(settings)
