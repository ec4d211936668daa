"""The job state machine's compare-and-set rules, on a migrated SQLite database (the embedded mode)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from app.db.migrate import upgrade
from app.db.session import async_sessions, make_async_engine, sync_sessions
from app.jobs import store
from app.settings import Settings, StoreSettings


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(store=StoreSettings(home=tmp_path))
    upgrade(s)
    return s


@pytest.fixture
def db(settings):
    """(async sessions, sync sessions) on the same SQLite file."""
    engine = make_async_engine(settings)
    yield async_sessions(engine), sync_sessions(settings)
    asyncio.run(engine.dispose())


def run(coro):
    return asyncio.run(coro)


def new_job(asessions, params=None, key=None, kind="model-pull"):
    job, created = run(store.create_job(asessions, kind, params or {"source": "/x", "name": "m"}, key))
    return job, created


def test_claim_then_redelivery_supersedes_the_first_attempt(db):
    asessions, sessions = db
    job, _ = new_job(asessions)
    first = store.claim(sessions, job.id, "w1")
    assert (first.attempt, first.kind, first.params) == (1, "model-pull", {"source": "/x", "name": "m"})
    assert store.report_progress(sessions, first, 10.0)
    second = store.claim(sessions, job.id, "w2", stale_after_s=0)  # the task came back after w1 was lost
    assert second.attempt == 2
    # The first attempt can neither report nor finish any more; the second can.
    assert not store.report_progress(sessions, first, 50.0)
    assert store.poll(sessions, first) == (False, False)
    with sessions.begin() as session:
        assert not store.finish(session, first, "succeeded", result={"path": "a"})
    with sessions.begin() as session:
        assert store.finish(session, second, "succeeded", result={"path": "b"})
    got = run(store.get_job(asessions, job.id))
    assert (got.status, got.attempts, got.worker, got.result, got.progress) == ("succeeded", 2, "w2", {"path": "b"}, 100.0)
    assert got.finished_at is not None and got.started_at is not None
    # A finished job is never claimed again (a late redelivery does nothing).
    assert store.claim(sessions, job.id, "w3") is None
    assert run(store.get_job(asessions, job.id)).attempts == 2


def age_job(sessions, job_id, seconds: float) -> None:
    """Move the row's updated_at (its heartbeat) `seconds` into the past: time passing with no write."""
    import datetime as dt

    from sqlalchemy import update

    from app.db.models import Job

    with sessions.begin() as session:  # in Python: SQLite has no datetime arithmetic on these columns
        then = session.get(Job, job_id).updated_at - dt.timedelta(seconds=seconds)
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=then))


def test_a_live_attempt_keeps_its_job_and_a_stale_one_is_taken_over(db):
    asessions, sessions = db
    job, _ = new_job(asessions)
    first = store.claim(sessions, job.id, "w1", stale_after_s=30)
    age_job(sessions, job.id, 20)
    with pytest.raises(store.JobHeld, match="attempt 1 on w1 is alive"):  # a duplicate message
        store.claim(sessions, job.id, "w2", stale_after_s=30)
    age_job(sessions, job.id, 20)  # 40 s without news, but a heartbeat arrives before the duplicate's check
    assert store.heartbeat(sessions, first)
    with pytest.raises(store.JobHeld):
        store.claim(sessions, job.id, "w2", stale_after_s=30)
    got = run(store.get_job(asessions, job.id))
    assert (got.status, got.attempts, got.worker) == ("running", 1, "w1")

    age_job(sessions, job.id, 31)  # w1 went quiet: its worker is lost
    second = store.claim(sessions, job.id, "w2", stale_after_s=30)
    assert second.attempt == 2
    assert not store.heartbeat(sessions, first) and store.heartbeat(sessions, second)
    with sessions.begin() as session:
        assert store.finish(session, second, "succeeded", result={})
    assert store.claim(sessions, job.id, "w3", stale_after_s=30) is None  # finished: nothing to do, not held


def test_the_embedded_start_up_requeues_running_jobs_whatever_their_heartbeat(db):
    asessions, sessions = db
    job, _ = new_job(asessions)
    store.claim(sessions, job.id, "embedded@old")
    assert store.requeue_running(sessions) == 1
    got = run(store.get_job(asessions, job.id))
    assert (got.status, got.worker) == ("queued", None)
    assert store.claim(sessions, job.id, "embedded@new").attempt == 2


def test_only_one_sweeper_takes_a_job_per_period(db):
    import datetime as dt

    from app.db.models import utcnow

    asessions, sessions = db
    old, _ = new_job(asessions, params={"source": "/x", "name": "old"})
    young, _ = new_job(asessions, params={"source": "/x", "name": "young"})
    running, _ = new_job(asessions, params={"source": "/x", "name": "running"})
    store.claim(sessions, running.id, "w")
    for job_id in (old.id, running.id):
        age_job(sessions, job_id, 600)
    before = utcnow() - dt.timedelta(seconds=300)
    assert store.unattended(sessions, queued_before=before, running_before=before) == [(old.id, "queued"), (running.id, "running")]
    assert store.mark_swept(sessions, old.id, "queued", before)
    assert not store.mark_swept(sessions, old.id, "queued", before)  # a second sweeper, same period
    assert not store.mark_swept(sessions, running.id, "queued", before)  # it moved on since it was found
    assert store.unattended(sessions, queued_before=before, running_before=before) == [(running.id, "running")]


def test_only_one_finish_wins(db):
    asessions, sessions = db
    job, _ = new_job(asessions)
    claim = store.claim(sessions, job.id, "w")
    with sessions.begin() as session:
        assert store.finish(session, claim, "failed", error="boom")
    with sessions.begin() as session:
        assert not store.finish(session, claim, "succeeded", result={})
    got = run(store.get_job(asessions, job.id))
    assert (got.status, got.error, got.result) == ("failed", "boom", None)


def test_release_puts_a_job_back_for_a_retry(db):
    asessions, sessions = db
    job, _ = new_job(asessions)
    claim = store.claim(sessions, job.id, "w")
    assert store.release(sessions, claim, "retrying after: 503")
    got = run(store.get_job(asessions, job.id))
    assert (got.status, got.error) == ("queued", "retrying after: 503")
    assert store.claim(sessions, job.id, "w").attempt == 2
    assert store.unfinished_ids(sessions) == [job.id]


def test_idempotency_key(db):
    asessions, _ = db
    job, created = new_job(asessions, key="k-1")
    again, created_again = new_job(asessions, key="k-1")
    assert created and not created_again and again.id == job.id
    with pytest.raises(store.JobConflict, match="already used for job .* with other parameters"):
        new_job(asessions, params={"source": "/y", "name": "m"}, key="k-1")
    with pytest.raises(store.JobConflict):
        new_job(asessions, key="k-1", kind="engine-build")
    other, created = new_job(asessions, key="k-2")
    assert created and other.id != job.id


def test_cancel_queued_running_finished(db):
    asessions, sessions = db
    queued, _ = new_job(asessions)
    cancelled = run(store.request_cancel(asessions, queued.id))
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert store.claim(sessions, queued.id, "w") is None  # its task finds nothing to do

    running, _ = new_job(asessions)
    claim = store.claim(sessions, running.id, "w")
    flagged = run(store.request_cancel(asessions, running.id))
    assert (flagged.status, flagged.cancel_requested) == ("running", True)
    assert store.poll(sessions, claim) == (True, True)
    with sessions.begin() as session:
        assert store.finish(session, claim, "cancelled", error="cancelled on request")
    with pytest.raises(store.JobConflict, match="already cancelled"):
        run(store.request_cancel(asessions, running.id))
    with pytest.raises(store.JobNotFound):
        run(store.request_cancel(asessions, uuid.uuid4()))
    with pytest.raises(store.JobNotFound):
        run(store.get_job(asessions, "not-a-uuid"))


def test_list_is_newest_first_with_filters_and_cursor(db):
    asessions, sessions = db
    ids = [new_job(asessions, params={"source": "/x", "name": f"m{i}"})[0].id for i in range(5)]
    build, _ = new_job(asessions, kind="engine-build", params={"model": "m", "profile": "native-bf16"})
    store.claim(sessions, ids[0], "w")

    page, more = run(store.list_jobs(asessions, kind="model-pull", limit=2))
    assert [j.id for j in page] == [ids[4], ids[3]] and more
    page, more = run(store.list_jobs(asessions, kind="model-pull", limit=2, after=str(ids[3])))
    assert [j.id for j in page] == [ids[2], ids[1]] and more
    page, more = run(store.list_jobs(asessions, kind="model-pull", limit=2, after=str(ids[1])))
    assert [j.id for j in page] == [ids[0]] and not more
    page, _ = run(store.list_jobs(asessions, limit=100))
    assert page[0].id == build.id and len(page) == 6
    page, _ = run(store.list_jobs(asessions, status="running"))
    assert [j.id for j in page] == [ids[0]]
    page, _ = run(store.list_jobs(asessions, limit=2, offset=4))
    assert [j.id for j in page] == [ids[1], ids[0]]
    with pytest.raises(store.JobNotFound):
        run(store.list_jobs(asessions, after=str(uuid.uuid4())))


def test_job_json_has_the_documented_fields(db):
    asessions, _ = db
    job, _ = new_job(asessions)
    body = store.job_json(run(store.get_job(asessions, job.id)))
    assert set(body) >= {"id", "kind", "status", "progress", "params", "result", "error", "created_at",
                         "started_at", "finished_at", "attempts"}  # fmt: skip
    assert body["created_at"].endswith("Z") and body["started_at"] is None and body["status"] == "queued"


def test_a_new_job_reads_back_as_created(db):
    asessions, _ = db
    job, _ = new_job(asessions, key="k-read")
    assert store.job_json(run(store.get_job(asessions, job.id))) == store.job_json(job)
    assert run(store.get_job(asessions, job.id)).result is None


def test_a_batch_of_submissions_is_one_insert_with_per_request_answers(db):
    """create_jobs (the API's batched INSERT): repeated keys in one batch make one job, a key reused
    with other parameters is a JobConflict for that request only, keyless requests each get a job."""
    asessions, _ = db
    params = {"source": "/x", "name": "same"}
    held, _ = new_job(asessions, params, key="held")
    batch = [
        store.NewJob("model-pull", params, "k1"),
        store.NewJob("model-pull", {"source": "/y", "name": "free"}),
        store.NewJob("model-pull", params, "k1"),
        store.NewJob("model-pull", {"source": "/x", "name": "other"}, "k1"),
        store.NewJob("model-pull", params, "held"),
        store.NewJob("engine-build", params, "held"),
        store.NewJob("model-pull", {"source": "/y", "name": "free"}),
    ]
    results = run(store.create_jobs(asessions, batch))
    assert len(results) == len(batch)
    (k1, made), (free1, made_free1), (k1_again, replayed), conflict, (held_again, held_new), wrong_kind, (free2, _) = results
    assert made and not replayed and k1_again.id == k1.id
    assert isinstance(conflict, store.JobConflict) and "with other parameters" in str(conflict)
    assert not held_new and held_again.id == held.id
    assert isinstance(wrong_kind, store.JobConflict)
    assert made_free1 and free1.id != free2.id
    got = run(store.get_jobs(asessions, [k1.id, str(free2.id), "not-an-id", str(uuid.uuid4()), held.id]))
    assert [g.id for g in (got[0], got[1], got[4])] == [k1.id, free2.id, held.id]
    assert all(isinstance(g, store.JobNotFound) for g in got[2:4])
    names = [j.params["name"] for j in run(store.list_jobs(asessions, limit=100))[0]]
    assert sorted(names) == ["free", "free", "same", "same"]


def test_a_batch_lists_in_the_order_it_arrived(db):
    asessions, _ = db
    batch = [store.NewJob("model-pull", {"source": "/x", "name": f"n{i}"}) for i in range(30)]
    run(store.create_jobs(asessions, batch))
    listed = [j.params["name"] for j in run(store.list_jobs(asessions, limit=100))[0]]
    assert listed == [f"n{i}" for i in reversed(range(30))]  # newest first
