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
from typing import Any

from app.db.session import sync_sessions
from app.jobs.coalesce import Coalescer
from app.jobs.context import TransientJobError
from app.settings import Settings

logger = logging.getLogger("app.jobs")


class EnqueueError(RuntimeError):
    """The job could not be handed to a worker (the broker is unreachable)."""


def _stopping() -> EnqueueError:
    return EnqueueError("the job dispatcher is stopping")


class CeleryDispatcher:
    """Publishes `mxext.run_job` messages with Celery, coalescing concurrent submissions.

    Submissions that arrive while a publish is in flight (or in the same event-loop tick) are sent
    together (app.jobs.coalesce): one hop to the sender thread, Celery's own message for each job
    (`send_task`, so the wire format is Celery's), and one Redis pipeline for all of them (kombu's
    `Producer.batch()`). A lone submission pays the same one thread hop and round trip it always
    did. Errors stay per request: every submission of a batch that could not be published gets
    EnqueueError (its caller answers 503 and fails the row). A batch whose pipeline failed part-way
    may have delivered some messages; their jobs are failed by their callers, and a worker's claim
    (a compare-and-set on `queued`/`running`) then finds nothing to run.
    """

    MAX_BATCH = 256  # messages per pipeline (kombu flushes by itself at 1000 commands)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._celery = None
        self._batches: Coalescer[str, None] = Coalescer(self._flush, self.MAX_BATCH, _stopping)
        # One sender thread: publishes never run in parallel (they are batched instead), and the
        # producer it takes from Celery's pool stays warm between batches.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        from app.jobs.celery_config import make_celery

        self._celery = make_celery(self.settings)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mxext-enqueue")
        self._batches = Coalescer(self._flush, self.MAX_BATCH, _stopping)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)

    def _warm_up(self) -> None:
        """What Celery sets up on its first publish (the broker connection, the producer pool, the
        result backend that send_task's AsyncResult loads: ~55 ms), done at start-up instead of
        under the first burst of submissions. A broker that is down now is not fatal: each
        submission then reports it (503) until it is back."""
        celery = self._celery
        assert celery is not None
        try:
            celery.backend  # noqa: B018 - loads the backend class (entry points, imports)
            with celery.producer_or_acquire() as producer:
                producer.connection.ensure_connection(max_retries=1)
        except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
            logger.warning("the job broker is not reachable yet (%s: %s); submissions answer 503 until it is",
                           type(exc).__name__, exc)  # fmt: skip

    async def stop(self) -> None:
        await self._batches.close(timeout=10.0)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self._celery is not None:
            celery, self._celery = self._celery, None
            await asyncio.to_thread(celery.close)

    async def submit(self, job_id: uuid.UUID) -> None:
        if self._celery is None or self._executor is None:
            raise EnqueueError("the job dispatcher has not started")
        await self._batches.submit(str(job_id))

    async def _flush(self, ids: list[str]) -> list[None | EnqueueError]:
        try:
            if self._executor is None:
                raise RuntimeError("the job dispatcher has stopped")
            error = await asyncio.get_running_loop().run_in_executor(self._executor, self._publish, ids)
        except Exception as exc:  # noqa: BLE001 - e.g. the executor shut down under us
            error = exc
        if error is None:
            return [None] * len(ids)
        return [EnqueueError(f"could not enqueue the job on Redis ({type(error).__name__}: {error})") for _ in ids]

    def _publish(self, ids: list[str]) -> Exception | None:
        """In the sender thread: publish() the batch."""
        if self._celery is None:
            return RuntimeError("the job dispatcher has stopped")
        return publish(self._celery, ids, self.MAX_BATCH)


def publish(celery: Any, ids: list[str], max_batch: int = CeleryDispatcher.MAX_BATCH) -> Exception | None:
    """One Celery message per job, one Redis pipeline for them all (kombu falls back to one LPUSH
    each where the Redis client would retry a pipeline by itself). The server's dispatcher and the
    workers' sweeper (app.jobs.sweeper) both send through this. Returns the error, if any."""
    from app.jobs.celery_config import TASK_NAME

    try:
        with celery.producer_or_acquire() as producer, producer.batch(max_size=max_batch + 1):
            for job_id in ids:
                # ignore_result: the row in the database is the job's state, nobody waits on
                # Celery's AsyncResult; without it every send subscribes to the result channel.
                celery.send_task(TASK_NAME, args=[job_id], ignore_result=True, producer=producer)
    except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
        return exc
    return None


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
        sessions = sync_sessions(self.settings)
        # A job a previous process left running may still have a fresh heartbeat, which a claim
        # would respect; nothing else runs this database's jobs, so it goes back to queued first.
        await asyncio.to_thread(store.requeue_running, sessions)
        left = await asyncio.to_thread(store.unfinished_ids, sessions)
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
