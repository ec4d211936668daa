"""The job state machine, on the row: every status move is a compare-and-set.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      │                 │  ▲ claim again (redelivery after a lost worker: attempts + 1)
      │                 └──┘ release (transient error: back to queued for a retry)
      └── cancel ──▶ cancelled            running + cancel → cancel_requested (the task stops itself)

Each move is one `UPDATE ... WHERE id = ? AND status IN (...) [AND attempts = ?] RETURNING`, so a
redelivered task never runs a finished job again, and once a redelivery has claimed a job (attempts
moved on) the older attempt can neither report progress nor finish it. A running attempt's
heartbeat is the row's updated_at: a claim takes a running job only once that is stale (its worker
is lost), so a duplicate message never restarts a live attempt. The API side is async (create, get,
list, cancel); the worker side is sync (claim, heartbeat, progress, poll, finish, release, and the
sweeper's unattended/mark_swept).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import uuid
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
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


@dataclasses.dataclass(slots=True)
class JobRecord:
    """A job row as the API side reads it (plain values, no ORM session behind it). The fields are
    the `jobs` table's columns, in table order."""

    id: uuid.UUID
    kind: str
    status: str
    progress: float
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    idempotency_key: str | None
    attempts: int
    worker: str | None
    cancel_requested: bool
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime


JOBS = Job.__table__
_ALL = tuple(JOBS.c)
assert [f.name for f in dataclasses.fields(JobRecord)] == [c.name for c in _ALL], "JobRecord must follow the jobs table"


def _record(row: Any) -> JobRecord:
    return JobRecord(*row)


def job_json(job: JobRecord | Job) -> dict[str, Any]:
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
#
# Every call is SQLAlchemy Core on one pooled connection in autocommit mode: each statement is its own
# transaction, so a submission is one `INSERT` round trip (no BEGIN/COMMIT, no ORM unit of work) and
# a read one `SELECT`. Every write is still a single statement whose WHERE clause is the
# compare-and-set, so nothing here needs a multi-statement transaction.

Sessions = async_sessionmaker[AsyncSession] | AsyncEngine


@functools.lru_cache(maxsize=16)
def _autocommit(engine: AsyncEngine) -> AsyncEngine:
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _connect(sessions: Sessions) -> Any:
    """A connection (async context manager) in autocommit mode on the sessions' engine."""
    engine = sessions if isinstance(sessions, AsyncEngine) else sessions.kw["bind"]
    return _autocommit(engine).connect()


_SELECT = select(*_ALL)
_GET = _SELECT.where(JOBS.c.id == bindparam("id"))  # request_cancel's re-read


@functools.lru_cache(maxsize=4)
def _insert_if_new(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, for this dialect."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - session.database_url only makes these two
        raise ValueError(f"no ON CONFLICT insert for {dialect}")
    return dialect_insert(JOBS).on_conflict_do_nothing(index_elements=[JOBS.c.idempotency_key]).returning(JOBS.c.id)


@dataclasses.dataclass(frozen=True, slots=True)
class NewJob:
    """A submission: what `create_jobs` inserts (or finds by its idempotency key)."""

    kind: str
    params: dict[str, Any]
    idempotency_key: str | None = None


CreateResult = tuple[JobRecord, bool]


async def create_job(
    sessions: Sessions, kind: str, params: dict[str, Any], idempotency_key: str | None = None
) -> CreateResult:
    """A new queued job, or the existing one for a repeated idempotency key: (job, created)."""
    (result,) = await create_jobs(sessions, [NewJob(kind, params, idempotency_key)])
    if isinstance(result, Exception):
        raise result
    return result


async def create_jobs(sessions: Sessions, requests: list[NewJob]) -> list[CreateResult | Exception]:
    """Many submissions in one round trip: (job, created) for each, in order, or the JobConflict of a
    request whose idempotency key holds a job with other parameters.

    One multi-row `INSERT ... ON CONFLICT (idempotency_key) DO NOTHING RETURNING id` (ids are made
    here, so the returned ids say which rows went in); a `SELECT` only for the keys that were taken.
    Two requests of one batch with the same key get the one job (the second row is the conflict).
    The API batches concurrent submissions through this (app.jobs.coalesce); `create_job` is one."""
    # One microsecond apart, in request order: a listing (newest first) keeps the order in which a
    # burst arrived, where one shared timestamp would have its ties broken by random id.
    start = utcnow()
    stamps = [start + dt.timedelta(microseconds=i) for i in range(len(requests))]
    jobs = [
        JobRecord(uuid.uuid4(), r.kind, "queued", 0.0, r.params, None, None, r.idempotency_key, 0, None, False, t,
                  None, None, t)
        for r, t in zip(requests, stamps)
    ]  # fmt: skip
    # The unset columns (result, error, worker, started_at, finished_at) are left to the database's
    # NULL, as the ORM insert did (a None for a JSON column would be stored as JSON null).
    values = [
        {"id": job.id, "kind": job.kind, "status": "queued", "progress": 0.0, "params": job.params,
         "idempotency_key": job.idempotency_key, "attempts": 0, "cancel_requested": False,
         "created_at": job.created_at, "updated_at": job.created_at}
        for job in jobs
    ]  # fmt: skip
    results: list[CreateResult | Exception | None] = [None] * len(requests)
    todo = list(range(len(requests)))
    async with _connect(sessions) as conn:
        # A taken key's holder can only vanish between the two statements if someone deletes jobs
        # by hand; its requests then go round again.
        for _ in range(3):
            if not todo:
                break
            inserted = {row[0] for row in await conn.execute(_insert_if_new(conn.dialect.name), [values[i] for i in todo])}
            taken = []
            for i in todo:
                if jobs[i].id in inserted:
                    results[i] = (jobs[i], True)
                else:
                    taken.append(i)
            keys = {requests[i].idempotency_key for i in taken}
            holders = {}
            if keys:
                rows = await conn.execute(_SELECT.where(JOBS.c.idempotency_key.in_(keys)))
                holders = {row.idempotency_key: _record(row) for row in rows}
            todo = []
            for i in taken:
                holder = holders.get(requests[i].idempotency_key)
                if holder is None:
                    todo.append(i)
                    continue
                try:
                    results[i] = (_same_request(holder, requests[i].kind, requests[i].params, holder.idempotency_key or ""), False)
                except JobConflict as exc:
                    results[i] = exc
    for i in todo:
        results[i] = RuntimeError(f"Idempotency-Key {requests[i].idempotency_key!r}: the job holding it keeps disappearing")
    return [r for r in results if r is not None]


def _same_request(existing: JobRecord, kind: str, params: dict[str, Any], key: str) -> JobRecord:
    if existing.kind != kind or existing.params != params:
        raise JobConflict(
            f"Idempotency-Key {key!r} was already used for job {existing.id} ({existing.kind}) with other "
            "parameters; use a new key for a different request"
        )
    return existing


def _not_found(job_id: Any) -> JobNotFound:
    return JobNotFound(f"No job with id {job_id!r}; list jobs with GET /v1/jobs")


async def get_job(sessions: Sessions, job_id: str | uuid.UUID) -> JobRecord:
    (result,) = await get_jobs(sessions, [job_id])
    if isinstance(result, Exception):
        raise result
    return result


async def get_jobs(sessions: Sessions, job_ids: list[str | uuid.UUID]) -> list[JobRecord | JobNotFound]:
    """Many reads by id in one `SELECT ... WHERE id IN (...)`: the job, or JobNotFound, for each id in
    order. The API batches concurrent reads through this (app.jobs.coalesce); `get_job` is one."""
    parsed = [parse_id(job_id) for job_id in job_ids]
    wanted = {p for p in parsed if p is not None}
    found: dict[uuid.UUID, JobRecord] = {}
    if wanted:
        async with _connect(sessions) as conn:
            found = {row.id: _record(row) for row in await conn.execute(_SELECT.where(JOBS.c.id.in_(wanted)))}
    return [found[p] if p in found else _not_found(job_id) for p, job_id in zip(parsed, job_ids)]


async def list_jobs(
    sessions: Sessions,
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 20,
    after: str | None = None,
    offset: int = 0,
) -> tuple[list[JobRecord], bool]:
    """Newest first; `after` is the id of the last job of the previous page. Returns (jobs, has_more)."""
    limit = max(1, min(MAX_PAGE, limit))
    query = _SELECT
    if kind:
        query = query.where(JOBS.c.kind == kind)
    if status:
        query = query.where(JOBS.c.status == status)
    async with _connect(sessions) as conn:
        if after is not None:
            parsed = parse_id(after)
            cursor = (
                (await conn.execute(select(JOBS.c.created_at, JOBS.c.id).where(JOBS.c.id == parsed))).first()
                if parsed is not None
                else None
            )
            if cursor is None:
                raise JobNotFound(f"after={after!r} is not the id of a job; pass the last id of the previous page")
            query = query.where(
                or_(JOBS.c.created_at < cursor.created_at,
                    and_(JOBS.c.created_at == cursor.created_at, JOBS.c.id < cursor.id))
            )  # fmt: skip
        query = query.order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).offset(max(0, offset)).limit(limit + 1)
        jobs = [_record(row) for row in await conn.execute(query)]
    return jobs[:limit], len(jobs) > limit


_CANCEL_QUEUED = (
    update(JOBS).where(JOBS.c.id == bindparam("job_id"), JOBS.c.status == "queued")
    .values(status="cancelled", error="cancelled before it started", finished_at=bindparam("now"),
            updated_at=bindparam("now"))
    .returning(*_ALL)
)  # fmt: skip
_FLAG_RUNNING = (
    update(JOBS).where(JOBS.c.id == bindparam("job_id"), JOBS.c.status == "running")
    .values(cancel_requested=True, updated_at=bindparam("now")).returning(*_ALL)
)  # fmt: skip


async def request_cancel(sessions: Sessions, job_id: str | uuid.UUID) -> JobRecord:
    """A queued job is cancelled at once; a running one gets its cancel flag (the task stops at its
    next check). JobConflict for a finished job."""
    parsed = parse_id(job_id)
    if parsed is None:
        raise _not_found(job_id)
    values = {"job_id": parsed, "now": utcnow()}
    async with _connect(sessions) as conn:
        row = (await conn.execute(_CANCEL_QUEUED, values)).first()
        if row is None:
            row = (await conn.execute(_FLAG_RUNNING, values)).first()
        if row is None:
            row = (await conn.execute(_GET, {"id": parsed})).first()
            if row is None:
                raise _not_found(job_id)
            if row.status in FINISHED:
                raise JobConflict(f"job {parsed} already {row.status}; there is nothing to cancel")
            # else it moved between our two updates (claimed just now): the caller may ask again
    return _record(row)


async def fail_unqueued(sessions: Sessions, job_id: uuid.UUID, error: str) -> None:
    """queued → failed for a job that could not be handed to a worker."""
    now = utcnow()
    async with _connect(sessions) as conn:
        await conn.execute(
            update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status == "queued")
            .values(status="failed", error=error, finished_at=now, updated_at=now)
        )  # fmt: skip


# ---- worker side (sync) --------------------------------------------------------------------------


class JobHeld(Exception):
    """A live attempt holds the job (its heartbeat is fresh): this delivery is a duplicate and checks
    again later, until the job finishes or its holder's heartbeat goes stale."""


def claim(sessions: sessionmaker[Session], job_id: str | uuid.UUID, worker: str, *, stale_after_s: float = 30.0) -> Claim | None:
    """queued → running; or running → running (attempts + 1) when the holder's heartbeat (updated_at)
    is older than `stale_after_s`: its worker is lost and this is the redelivery. The default is 3 ×
    the default heartbeat; the runner passes the settings' value.

    None when the job is unknown or already finished: the task has nothing to do. JobHeld when a
    live attempt runs it: taking it would throw that attempt's work away."""
    parsed = parse_id(job_id)
    if parsed is None:
        return None
    now = utcnow()
    takeable = or_(Job.status == "queued",
                   and_(Job.status == "running", Job.updated_at <= now - dt.timedelta(seconds=stale_after_s)))  # fmt: skip
    with sessions.begin() as session:
        row = session.execute(
            update(Job).where(Job.id == parsed, takeable)
            .values(status="running", attempts=Job.attempts + 1, worker=worker[:255],
                    started_at=func.coalesce(Job.started_at, now), updated_at=now)
            .returning(Job.kind, Job.params, Job.attempts, Job.cancel_requested)
        ).one_or_none()  # fmt: skip
        if row is None:
            held = session.execute(
                select(Job.status, Job.attempts, Job.worker, Job.updated_at).where(Job.id == parsed)
            ).one_or_none()
    if row is not None:
        return Claim(parsed, row.kind, dict(row.params or {}), row.attempts, bool(row.cancel_requested))
    if held is None or held.status in FINISHED:
        return None
    # Running with a fresh heartbeat (or moved back to queued between our two statements, which a
    # later check takes).
    age = (now - _aware(held.updated_at)).total_seconds()
    raise JobHeld(f"job {parsed}: attempt {held.attempts} on {held.worker} is alive (last heartbeat {age:.1f} s ago)")


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)  # SQLite: naive UTC


def _mine(claim_: Claim) -> Any:
    return and_(Job.id == claim_.job_id, Job.status == "running", Job.attempts == claim_.attempt)


def heartbeat(sessions: sessionmaker[Session], claim_: Claim) -> bool:
    """Refresh updated_at, the sign of life other workers' claims read; False when this attempt no
    longer owns the job."""
    with sessions.begin() as session:
        result = session.execute(update(Job).where(_mine(claim_)).values(updated_at=utcnow()))
    return result.rowcount == 1


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


def requeue_running(sessions: sessionmaker[Session]) -> int:
    """running → queued for every running job, whatever its heartbeat: at an embedded runner's
    start-up the process that ran them is gone. Returns how many."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job).where(Job.status == "running").values(status="queued", worker=None, updated_at=utcnow())
        )
    return result.rowcount


def unfinished_ids(sessions: sessionmaker[Session]) -> list[uuid.UUID]:
    """Jobs left queued or running (oldest first): the embedded runner re-queues them on start-up."""
    with sessions() as session:
        query = select(Job.id).where(Job.status.in_(("queued", "running"))).order_by(Job.created_at)
        return list(session.execute(query).scalars())


def unattended(sessions: sessionmaker[Session], *, queued_before: dt.datetime, running_before: dt.datetime,
               limit: int = 500) -> list[tuple[uuid.UUID, str]]:  # fmt: skip
    """(id, status) of jobs queued and untouched since `queued_before`, or running with no heartbeat
    since `running_before`, oldest first: the sweeper checks whether their message is still in Redis."""
    query = (
        select(Job.id, Job.status)
        .where(or_(and_(Job.status == "queued", Job.updated_at < queued_before),
                   and_(Job.status == "running", Job.updated_at < running_before)))
        .order_by(Job.updated_at).limit(limit)
    )  # fmt: skip
    with sessions() as session:
        return [(row.id, row.status) for row in session.execute(query)]


def mark_swept(sessions: sessionmaker[Session], job_id: uuid.UUID, status: str, before: dt.datetime) -> bool:
    """updated_at = now for a job still `status` and untouched since `before`: of many sweepers that
    found it, the one whose UPDATE matched acts on it, and none looks at it again for a period."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.status == status, Job.updated_at < before).values(updated_at=utcnow())
        )
    return result.rowcount == 1
