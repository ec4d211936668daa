"""The Celery dispatcher: concurrent submissions are published together, errors stay per request."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from app.jobs.celery_config import QUEUE, TASK_NAME
from app.jobs.dispatch import CeleryDispatcher, EnqueueError
from app.settings import ControlPlaneSettings, Settings


def _settings(redis_url: str) -> Settings:
    return Settings(control=ControlPlaneSettings(redis_url=redis_url))


def test_concurrent_submissions_go_out_in_one_batch_and_errors_reach_every_caller(monkeypatch):
    dispatcher = CeleryDispatcher(_settings("redis://127.0.0.1:6379/9"))
    batches: list[list[str]] = []
    failing = {"on": False}

    def publish(ids):
        batches.append(ids)
        return ConnectionError("refused") if failing["on"] else None

    monkeypatch.setattr(dispatcher, "_publish", publish)

    async def scenario():
        await dispatcher.start()
        try:
            ids = [uuid.uuid4() for _ in range(20)]
            await asyncio.gather(*(dispatcher.submit(i) for i in ids))
            assert batches == [[str(i) for i in ids]]
            await dispatcher.submit(ids[0])  # a lone one goes out on its own
            assert batches[-1] == [str(ids[0])]
            failing["on"] = True
            results = await asyncio.gather(*(dispatcher.submit(i) for i in ids[:5]), return_exceptions=True)
            assert all(isinstance(r, EnqueueError) and "ConnectionError: refused" in str(r) for r in results)
        finally:
            await dispatcher.stop()

    asyncio.run(scenario())


def test_publishes_celery_messages_to_redis(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    dispatcher = CeleryDispatcher(_settings(redis_url))
    ids = [uuid.uuid4() for _ in range(30)]
    wanted = {repr([str(i)]) for i in ids}

    async def scenario():
        await dispatcher.start()
        try:
            await asyncio.gather(*(dispatcher.submit(i) for i in ids))
        finally:
            await dispatcher.stop()

    mine = []
    try:
        asyncio.run(scenario())
        # only our own messages: another test run may share this Redis database
        mine = [raw for raw in client.lrange(QUEUE, 0, -1) if json.loads(raw)["headers"]["argsrepr"] in wanted]
        messages = [json.loads(raw) for raw in mine]
        assert len(messages) == 30
        assert {m["headers"]["task"] for m in messages} == {TASK_NAME}
        assert all(m["headers"]["ignore_result"] for m in messages)
    finally:
        for raw in mine:
            client.lrem(QUEUE, 1, raw)
        client.close()


def test_an_unreachable_broker_is_an_enqueue_error():
    dispatcher = CeleryDispatcher(_settings("redis://127.0.0.1:1/0"))

    async def scenario():
        await dispatcher.start()
        try:
            return await asyncio.gather(*(dispatcher.submit(uuid.uuid4()) for _ in range(3)), return_exceptions=True)
        finally:
            await dispatcher.stop()

    results = asyncio.run(scenario())
    assert all(isinstance(r, EnqueueError) and "could not enqueue the job on Redis" in str(r) for r in results)


@pytest.mark.parametrize("n", [1, 300])
def test_every_submission_is_answered(monkeypatch, n):
    """More than one batch's worth at once: every caller hears back, in batches of MAX_BATCH."""
    dispatcher = CeleryDispatcher(_settings("redis://127.0.0.1:6379/9"))
    sizes: list[int] = []
    monkeypatch.setattr(dispatcher, "_publish", lambda ids: sizes.append(len(ids)))

    async def scenario():
        await dispatcher.start()
        try:
            await asyncio.gather(*(dispatcher.submit(uuid.uuid4()) for _ in range(n)))
        finally:
            await dispatcher.stop()

    asyncio.run(scenario())
    assert sum(sizes) == n and max(sizes) <= CeleryDispatcher.MAX_BATCH
