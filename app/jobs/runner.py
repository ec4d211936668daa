"""Run one job: claim the row, call its service with a context that writes progress and reads the
cancel flag, then record how it ended. The same function runs in a Celery worker and in the
embedded runner thread.

How it ends:
* success → succeeded, with the kind's side rows written in the same transaction;
* JobError → failed with its message; JobCancelled → cancelled;
* TransientJobError → back to queued and re-raised for a retry with backoff while retries remain,
  then failed with the last message;
* anything else → failed with `Type: message` (logged with its traceback);
* the claim moved on to a newer attempt (a redelivery) → this attempt stops writing and leaves;
* a live attempt holds the job (a duplicate message) → "held": nothing is run, the task checks again
  later (workers/tasks.py).

While the service runs, a heartbeat thread refreshes the row's updated_at: that is how another
worker's claim tells a live attempt (leave it alone) from a lost one (take the job over).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db.session import sync_sessions
from app.jobs import store
from app.jobs.context import JobCancelled, JobContext, JobError, TransientJobError
from app.jobs.kinds import KINDS, JobKind
from app.settings import Settings

logger = logging.getLogger("app.jobs")

CANCEL_POLL_INTERVAL_S = 1.0


class JobSuperseded(Exception):
    """A newer attempt (a redelivered task) owns the job: this one must stop writing."""


class JobInterrupted(Exception):
    """The process is shutting down (embedded runner): the job goes back to the queue."""


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _RowLink:
    """Progress and cancel checks of one attempt, through the job's row (cancel reads throttled)."""

    def __init__(self, sessions: sessionmaker[Session], claim: store.Claim, stopping: Callable[[], bool]) -> None:
        self.sessions = sessions
        self.claim = claim
        self.stopping = stopping
        self._checked_at = 0.0
        self._cancelled = False

    def progress(self, percent: float) -> None:
        if not store.report_progress(self.sessions, self.claim, percent):
            raise JobSuperseded(f"job {self.claim.job_id}: attempt {self.claim.attempt} no longer owns it")

    def cancel_requested(self) -> bool:
        if self.stopping():
            raise JobInterrupted("the server is shutting down")
        now = time.monotonic()
        if not self._cancelled and now - self._checked_at >= CANCEL_POLL_INTERVAL_S:
            self._checked_at = now
            self._cancelled, ours = store.poll(self.sessions, self.claim)
            if not ours:
                raise JobSuperseded(f"job {self.claim.job_id}: attempt {self.claim.attempt} no longer owns it")
        return self._cancelled


class _Heartbeat:
    """A thread that refreshes the attempt's row every `interval_s` while the service runs (a
    download chunk or a benchmark may report no progress for minutes)."""

    def __init__(self, sessions: sessionmaker[Session], claim: store.Claim, interval_s: float) -> None:
        self.sessions = sessions
        self.claim = claim
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"mxext-heartbeat-{claim.job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not store.heartbeat(self.sessions, self.claim):
                    return  # superseded or finished: the attempt finds out at its next check
            except Exception as exc:  # noqa: BLE001 - a database blip: the next beat tries again
                logger.warning("job %s: heartbeat failed (%s: %s)", self.claim.job_id, type(exc).__name__, exc)


def run_job(
    job_id: str | uuid.UUID,
    settings: Settings,
    *,
    worker: str | None = None,
    can_retry: bool = False,
    stopping: Callable[[], bool] = lambda: False,
) -> str:
    """Run the job if it is still to run; returns how it ended (succeeded, failed, cancelled, retry,
    skipped, held, superseded, interrupted). Re-raises TransientJobError when `can_retry`."""
    sessions = sync_sessions(settings)
    try:
        claim = store.claim(sessions, job_id, worker or default_worker_name(),
                            stale_after_s=settings.control.job_stale_after_s)  # fmt: skip
    except store.JobHeld as exc:
        logger.info("%s; this delivery is a duplicate and leaves it running", exc)
        return "held"
    if claim is None:
        logger.info("job %s: already finished or unknown; nothing to do", job_id)
        return "skipped"
    if claim.cancel_requested:  # cancelled while its worker was lost
        return _finish(sessions, claim, "cancelled", error="cancelled on request")
    spec = KINDS.get(claim.kind)
    if spec is None:
        return _finish(sessions, claim, "failed", error=f"job kind {claim.kind!r} is not known to this worker")
    link = _RowLink(sessions, claim, stopping)
    ctx = JobContext(str(claim.job_id), settings, report_progress=link.progress, cancel_requested=link.cancel_requested)
    logger.info("job %s (%s): attempt %d started", claim.job_id, claim.kind, claim.attempt)
    try:
        with _Heartbeat(sessions, claim, settings.control.job_heartbeat_s):
            result = spec.run(claim.params, ctx)
    except JobCancelled:
        return _finish(sessions, claim, "cancelled", error="cancelled on request")
    except JobSuperseded as exc:
        logger.warning("%s; leaving it to the newer attempt", exc)
        return "superseded"
    except JobInterrupted:
        store.release(sessions, claim, "interrupted by a shutdown; it runs again when the server starts")
        return "interrupted"
    except TransientJobError as exc:
        if can_retry:
            logger.warning("job %s: transient error, retrying: %s", claim.job_id, exc)
            store.release(sessions, claim, f"retrying after: {exc}")
            raise
        return _finish(sessions, claim, "failed", error=f"{exc} (gave up after {claim.attempt} attempts)")
    except JobError as exc:
        return _finish(sessions, claim, "failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen failure: the job says what it was
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            limit = settings.control.job_soft_time_limit_s
            return _finish(sessions, claim, "failed", error=f"the job ran past its time limit ({limit} s, "
                           "MXEXT_JOB_SOFT_TIME_LIMIT) and was stopped")  # fmt: skip
        logger.exception("job %s (%s) failed", claim.job_id, claim.kind)
        return _finish(sessions, claim, "failed", error=f"{type(exc).__name__}: {exc}")
    return _succeed(sessions, claim, spec, result, settings)


def _succeed(sessions: sessionmaker[Session], claim: store.Claim, spec: JobKind, result: Any, settings: Settings) -> str:
    if not isinstance(result, dict):
        return _finish(sessions, claim, "failed", error=f"the {spec.name} service returned no result object")
    try:
        with sessions() as session:
            if not store.finish(session, claim, "succeeded", result=result):
                session.rollback()
                logger.warning("job %s: attempt %d finished its work but no longer owns the job", claim.job_id, claim.attempt)
                return "superseded"
            if spec.record is not None:
                spec.record(session, claim.job_id, claim.params, result)
            session.commit()
    except Exception as exc:  # noqa: BLE001 - e.g. the registry refused the adapter
        logger.exception("job %s: recording the result failed", claim.job_id)
        _remove_output(settings, result)
        return _finish(sessions, claim, "failed", error=f"the work finished but recording it failed: {type(exc).__name__}: {exc}")
    logger.info("job %s (%s): succeeded", claim.job_id, claim.kind)
    if spec.after_commit is not None:
        try:
            spec.after_commit(settings, claim.params, result)
        except Exception:  # noqa: BLE001 - a lost hint is repaired by the next reconcile
            logger.exception("job %s: the after-commit hint failed (replicas catch up on their timer)", claim.job_id)
    return "succeeded"


def _remove_output(settings: Settings, result: dict[str, Any]) -> None:
    """A job that fails after its service wrote its output leaves nothing behind in the store."""
    path = Path(str(result.get("path") or ""))
    store_dirs = (settings.store.models_dir.resolve(), settings.store.adapters_dir.resolve())
    if path.name and path.exists() and path.resolve().parent in store_dirs:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _finish(sessions: sessionmaker[Session], claim: store.Claim, status: str, *, error: str | None = None) -> str:
    with sessions.begin() as session:
        owned = store.finish(session, claim, status, error=error)
    if not owned:
        return "superseded"
    log = logger.info if status == "cancelled" else logger.warning
    log("job %s (%s): %s: %s", claim.job_id, claim.kind, status, error)
    return status
