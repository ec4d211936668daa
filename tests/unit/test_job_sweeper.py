"""The sweeper against a real Redis (a redis-server of this module's own, so the queue holds only our
messages) and a migrated SQLite database: which messages count as still in the broker, and which
jobs one sweep publishes again."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from app.db.migrate import upgrade
from app.db.models import utcnow
from app.db.session import async_sessions, make_async_engine, sync_sessions
from app.jobs import store
from app.jobs.celery_config import QUEUE, make_celery
from app.jobs.dispatch import publish
from app.jobs.sweeper import Sweeper, job_ids_in_broker
from app.settings import ControlPlaneSettings, Settings, StoreSettings
from tests.unit.test_job_store import age_job


@pytest.fixture
def celery(redis_server):
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    app = make_celery(Settings(control=ControlPlaneSettings(redis_url=redis_server.url)))
    yield app
    app.close()


def test_a_message_counts_while_queued_or_unacknowledged(celery):
    ids = ["00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"]
    assert publish(celery, ids) is None
    assert job_ids_in_broker(celery) == set(ids)
    with celery.connection_for_read() as connection:
        channel = connection.default_channel
        held = channel.basic_get(QUEUE, no_ack=False)  # as a worker takes one: into kombu's unacked hash
        assert channel.client.llen(QUEUE) == 1 and channel.client.hlen(channel.unacked_key) == 1
        assert job_ids_in_broker(celery) == set(ids)
        channel.basic_ack(held.delivery_tag)
        assert job_ids_in_broker(celery) == {ids[1]}
        channel.client.lpush(QUEUE, b"not a celery message")
    assert job_ids_in_broker(celery) == {ids[1]}


def test_one_sweep_publishes_only_the_jobs_whose_message_is_gone(celery, redis_server, tmp_path, caplog):
    settings = Settings(store=StoreSettings(home=tmp_path),
                        control=ControlPlaneSettings(redis_url=redis_server.url, job_heartbeat_s=1, job_requeue_after_s=60))  # fmt: skip
    upgrade(settings)
    sessions = sync_sessions(settings)
    engine = make_async_engine(settings)

    async def create(names):
        made = [await store.create_job(async_sessions(engine), "model-pull", {"source": "/x", "name": n}) for n in names]
        await engine.dispose()
        return {name: job.id for name, (job, _) in zip(names, made)}

    jobs = asyncio.run(create(["lost", "backlog", "young", "running-lost", "running-held", "running-live"]))
    for name in ("running-lost", "running-held", "running-live"):
        store.claim(sessions, jobs[name], "w")
    for name in ("lost", "backlog", "running-lost", "running-held"):
        age_job(sessions, jobs[name], 120)
    assert publish(celery, [str(jobs["running-held"]), str(jobs["backlog"])]) is None  # first in, first out
    with celery.connection_for_read() as connection:  # the lost worker's message, never acknowledged
        held = connection.default_channel.basic_get(QUEUE, no_ack=False)
        assert str(jobs["running-held"]) in held.body.decode()

    caplog.set_level("INFO", logger="app.jobs")
    sweeper = Sweeper(settings, celery)
    assert sorted(sweeper.sweep()) == sorted([jobs["lost"], jobs["running-lost"]])
    assert job_ids_in_broker(celery) == {str(jobs[n]) for n in ("lost", "backlog", "running-lost", "running-held")}
    assert f"job {jobs['lost']} re-published: queued for over 60 s" in caplog.text
    assert f"job {jobs['running-lost']} re-published: running with no heartbeat for over 60 s" in caplog.text
    # The backlog was touched (not looked at again for a period), the held one left stale for its
    # redelivery to claim; a second sweep publishes nothing twice.
    ages = {name: (utcnow() - _updated_at(sessions, jobs[name])).total_seconds() for name in jobs}
    assert all(ages[n] < 10 for n in ("lost", "backlog", "running-lost")) and ages["running-held"] > 100, ages
    assert sweeper.sweep() == []
    sweeper.stop()


def _updated_at(sessions, job_id):
    from app.db.models import Job

    with sessions() as session:
        value = session.get(Job, job_id).updated_at
    return value.replace(tzinfo=datetime.timezone.utc)  # SQLite hands back naive UTC


def test_the_settings_refuse_periods_that_cannot_work(monkeypatch):
    for name in ("MXEXT_JOB_HEARTBEAT", "MXEXT_JOB_SWEEP_INTERVAL", "MXEXT_JOB_REQUEUE_AFTER"):
        monkeypatch.setenv(name, "0")
        with pytest.raises(ValueError, match=f"{name}=0.0: must be a positive number of seconds"):
            ControlPlaneSettings.from_env()
        monkeypatch.delenv(name)
    monkeypatch.setenv("MXEXT_VISIBILITY_TIMEOUT", "30")
    with pytest.raises(ValueError, match="MXEXT_JOB_HEARTBEAT=10 is too long for a visibility timeout of 30 s.*at most 5 s"):
        ControlPlaneSettings.from_env()
    monkeypatch.setenv("MXEXT_JOB_HEARTBEAT", "5")
    assert ControlPlaneSettings.from_env().job_stale_after_s == 15
