"""The job state machine, on the row: every status move is a compare-and-set.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      │                 │  ▲ claim again (redelivery after a lost worker: attempts + 1)
      │                 └──┘ release (transient error: back to queued for a retry)
      └── cancel ──▶ cancelled            running + cancel → cancel_requested (the task stops itself)

Each move is one `UPDATE ... WHERE id = ? AND status IN (...) [AND attempts = ?] RETURNING`, so a
redelivered task never runs a finished job again, and once a redelivery has claimed a job (attempts
moved on) the older attempt can neither report progress nor finish it. The API side is async
(create, get, list, cancel); the worker side is sync (claim, progress, poll, finish, release).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import FINISHED, Job, utcnow

MAX_PAGE = 100


class JobNotFound(LookupError):
    """No job with that id."""


class JobConflict(Exception):
    """The request contradicts the job's state (an idempotency key reused with other params, a
    cancel of a finished job); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a worker holds after claiming a job: its attempt number guards every later write."""

    job_id: uuid.UUID
    kind: str
    params: dict[str, Any]
    attempt: int
    cancel_requested: bool


def parse_id(job_id: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except ValueError:
        return None


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; we only ever store UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat().replace("+00:00", "Z")


def job_json(job: Job) -> dict[str, Any]:
    """The job as the API shows it."""
    return {
        "id": str(job.id),
        "object": "job",
        "kind": job.kind,
        "status": job.status,
        "progress": round(job.progress or 0.0, 2),
        "params": job.params,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


# ---- API side (async) ----------------------------------------------------------------------------


async def create_job(
    sessions: async_sessionmaker[AsyncSession], kind: str, params: dict[str, Any], idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """A new queued job, or the existing one for a repeated idempotency key: (job, created)."""
    if idempotency_key is not None:
        existing = await _by_key(sessions, idempotency_key)
        if existing is not None:
            return _same_request(existing, kind, params, idempotency_key), False
    job = Job(id=uuid.uuid4(), kind=kind, status="queued", progress=0.0, params=params, idempotency_key=idempotency_key,
              attempts=0, cancel_requested=False, created_at=utcnow())  # fmt: skip
    try:
        async with sessions() as session, session.begin():
            session.add(job)
    except IntegrityError:
        # Two submissions with one key raced; the other insert won.
        existing = await _by_key(sessions, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_request(existing, kind, params, idempotency_key or ""), False
    return job, True


async def _by_key(sessions: async_sessionmaker[AsyncSession], key: str) -> Job | None:
    async with sessions() as session:
        return (await session.execute(select(Job).where(Job.idempotency_key == key))).scalar_one_or_none()


def _same_request(existing: Job, kind: str, params: dict[str, Any], key: str) -> Job:
    if existing.kind != kind or existing.params != params:
        raise JobConflict(
            f"Idempotency-Key {key!r} was already used for job {existing.id} ({existing.kind}) with other "
            "parameters; use a new key for a different request"
        )
    return existing


async def get_job(sessions: async_sessionmaker[AsyncSession], job_id: str | uuid.UUID) -> Job:
    parsed = parse_id(job_id)
    if parsed is not None:
        async with sessions() as session:
            job = await session.get(Job, parsed)
            if job is not None:
                return job
    raise JobNotFound(f"No job with id {job_id!r}; list jobs with GET /v1/jobs")


async def list_jobs(
    sessions: async_sessionmaker[AsyncSession],
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 20,
    after: str | None = None,
    offset: int = 0,
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page. Returns (jobs, has_more)."""
    limit = max(1, min(MAX_PAGE, limit))
    query: Select[tuple[Job]] = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    async with sessions() as session:
        if after is not None:
            cursor = await session.get(Job, parse_id(after)) if parse_id(after) else None
            if cursor is None:
                raise JobNotFound(f"after={after!r} is not the id of a job; pass the last id of the previous page")
            query = query.where(
                or_(Job.created_at < cursor.created_at, and_(Job.created_at == cursor.created_at, Job.id < cursor.id))
            )
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).offset(max(0, offset)).limit(limit + 1)
        jobs = list((await session.execute(query)).scalars())
    return jobs[:limit], len(jobs) > limit


async def request_cancel(sessions: async_sessionmaker[AsyncSession], job_id: str | uuid.UUID) -> Job:
    """A queued job is cancelled at once; a running one gets its cancel flag (the task stops at its
    next check). JobConflict for a finished job."""
    job = await get_job(sessions, job_id)
    now = utcnow()
    async with sessions() as session, session.begin():
        row = (await session.execute(
            update(Job).where(Job.id == job.id, Job.status == "queued")
            .values(status="cancelled", error="cancelled before it started", finished_at=now, updated_at=now)
            .returning(Job)
        )).scalar_one_or_none()  # fmt: skip
        if row is None:
            row = (await session.execute(
                update(Job).where(Job.id == job.id, Job.status == "running")
                .values(cancel_requested=True, updated_at=now).returning(Job)
            )).scalar_one_or_none()  # fmt: skip
    if row is not None:
        return row
    job = await get_job(sessions, job_id)
    if job.status in FINISHED:
        raise JobConflict(f"job {job.id} already {job.status}; there is nothing to cancel")
    return job  # it moved between our two updates (claimed just now); ask again


async def fail_unqueued(sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID, error: str) -> None:
    """queued → failed for a job that could not be handed to a worker."""
    now = utcnow()
    async with sessions() as session, session.begin():
        await session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="failed", error=error, finished_at=now, updated_at=now)
        )  # fmt: skip


# ---- worker side (sync) --------------------------------------------------------------------------


def claim(sessions: sessionmaker[Session], job_id: str | uuid.UUID, worker: str) -> Claim | None:
    """queued → running, or running → running for a redelivery after a lost worker (attempts + 1).
    None when the job is unknown or already finished: the task has nothing to do."""
    parsed = parse_id(job_id)
    if parsed is None:
        return None
    now = utcnow()
    with sessions.begin() as session:
        row = session.execute(
            update(Job).where(Job.id == parsed, Job.status.in_(("queued", "running")))
            .values(status="running", attempts=Job.attempts + 1, worker=worker[:255],
                    started_at=func.coalesce(Job.started_at, now), updated_at=now)
            .returning(Job.kind, Job.params, Job.attempts, Job.cancel_requested)
        ).one_or_none()  # fmt: skip
    if row is None:
        return None
    return Claim(parsed, row.kind, dict(row.params or {}), row.attempts, bool(row.cancel_requested))


def _mine(claim_: Claim) -> Any:
    return and_(Job.id == claim_.job_id, Job.status == "running", Job.attempts == claim_.attempt)


def report_progress(sessions: sessionmaker[Session], claim_: Claim, percent: float) -> bool:
    """Write the progress; False when this attempt no longer owns the job."""
    with sessions.begin() as session:
        result = session.execute(update(Job).where(_mine(claim_)).values(progress=percent, updated_at=utcnow()))
    return result.rowcount == 1


def poll(sessions: sessionmaker[Session], claim_: Claim) -> tuple[bool, bool]:
    """(cancel requested, still ours) for a running attempt."""
    with sessions() as session:
        row = session.execute(
            select(Job.status, Job.attempts, Job.cancel_requested).where(Job.id == claim_.job_id)
        ).one_or_none()
    if row is None:
        return False, False
    return bool(row.cancel_requested), row.status == "running" and row.attempts == claim_.attempt


def finish(
    session: Session,
    claim_: Claim,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """running → `status` inside the caller's transaction (so side rows commit with it); False when
    another attempt owns the job or it already finished (the caller rolls back)."""
    assert status in FINISHED
    now = utcnow()
    values: dict[str, Any] = {"status": status, "result": result, "error": error, "finished_at": now, "updated_at": now}
    if status == "succeeded":
        values["progress"] = 100.0
    updated = session.execute(update(Job).where(_mine(claim_)).values(**values).returning(Job.id)).one_or_none()
    return updated is not None


def release(sessions: sessionmaker[Session], claim_: Claim, error: str) -> bool:
    """running → queued before a retry (a transient error), keeping the error text visible."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job).where(_mine(claim_)).values(status="queued", error=error, worker=None, updated_at=utcnow())
        )
    return result.rowcount == 1


def fail_running(sessions: sessionmaker[Session], job_id: str | uuid.UUID, error: str) -> bool:
    """Any attempt → failed: for a task the worker killed (hard time limit), which cannot finish itself."""
    parsed = parse_id(job_id)
    if parsed is None:
        return False
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            update(Job).where(Job.id == parsed, Job.status.in_(("queued", "running")))
            .values(status="failed", error=error, finished_at=now, updated_at=now)
        )  # fmt: skip
    return result.rowcount == 1


def unfinished_ids(sessions: sessionmaker[Session]) -> list[uuid.UUID]:
    """Jobs left queued or running (oldest first): the embedded runner re-queues them on start-up."""
    with sessions() as session:
        query = select(Job.id).where(Job.status.in_(("queued", "running"))).order_by(Job.created_at)
        return list(session.execute(query).scalars())
