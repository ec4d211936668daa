"""The workers' sweeper: Postgres is the truth, Redis messages are hints. A hint can be lost (Redis
keeps nothing on disk, so a restart drops every message; a server can die between the row's INSERT
and the publish), and then the row would wait forever. Each `mxext worker` runs a sweeper thread
that, every MXEXT_JOB_SWEEP_INTERVAL seconds, looks for

* jobs queued for longer than MXEXT_JOB_REQUEUE_AFTER seconds, and
* jobs running with no heartbeat for that long (and at least the claim's staleness window),

and publishes each again when no message for it is left in Redis: neither waiting in the queue nor
delivered to a worker and not yet acknowledged (kombu's `unacked` hash). A queued job whose message
is still there is a plain backlog: its updated_at is touched, nothing is published. A running job
whose message is still there belongs to a lost worker whose task Redis hands back after the
visibility timeout; it is left alone.

Many workers sweep the same table: the right to act on a job for one period is a compare-and-set
UPDATE of its updated_at (store.mark_swept), so only one of them publishes it. A message that is
published twice anyway (a worker taking the old one at the moment of the check) is harmless: the
claim's compare-and-set runs the job once, and the duplicate waits for it to finish.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import uuid
from typing import Any

from sqlalchemy.orm import sessionmaker

from app.db.models import utcnow
from app.db.session import make_sync_engine
from app.jobs import store
from app.jobs.celery_config import QUEUE, TASK_NAME
from app.jobs.dispatch import publish
from app.settings import Settings

logger = logging.getLogger("app.jobs")

LRANGE_CHUNK = 1000  # queue entries read per round trip


def job_ids_in_broker(celery: Any) -> set[str]:
    """Ids of the jobs with a `mxext.run_job` message in Redis: in the queue (every priority's list)
    or delivered and unacknowledged (held by a worker, ETA retries included)."""
    raws: list[bytes] = []
    with celery.connection_or_acquire() as connection:
        channel = connection.default_channel
        # kombu's own key names, so priority lists and a global_keyprefix stay right.
        keys = {channel._q_for_pri(QUEUE, priority) for priority in channel.priority_steps}
        # The lists first, then the unacked hash: a message a worker takes meanwhile moves from one to
        # the other, and is seen in one of them.
        with channel.conn_or_acquire() as client:
            for key in keys:
                start = 0
                while chunk := client.lrange(key, start, start + LRANGE_CHUNK - 1):
                    raws.extend(chunk)
                    start += len(chunk)
            # unacked: delivery tag → [message, exchange, routing key]
            raws.extend(client.hvals(channel.unacked_key))
    return {job_id for raw in raws if (job_id := _job_id(raw)) is not None}


def _job_id(raw: bytes | str) -> str | None:
    """The job id of a Celery protocol 2 `mxext.run_job` message (the list entry, or an unacked
    entry wrapping one), None for anything else."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):
            message = message[0]
        if message.get("headers", {}).get("task") != TASK_NAME:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # protocol 2 body: [args, kwargs, embed]
        return str(args[0])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


class Sweeper:
    """Re-publishes jobs whose message was lost; run in a thread by each worker (start/stop)."""

    def __init__(self, settings: Settings, celery: Any) -> None:
        self.settings = settings
        self.celery = celery
        # An engine of its own, not sync_sessions' process-wide one: the sweeper runs in a prefork
        # worker's parent, whose later-forked pool children must not inherit live connections
        # through that cache (they build their own on first use).
        self._engine = make_sync_engine(settings)
        self.sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="mxext-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._engine.dispose()

    def _loop(self) -> None:
        # The first sweep runs at once: after a restart of the whole stack, lost jobs go out as
        # soon as a worker is up.
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - Postgres or Redis away: the next period tries again
                logger.warning("job sweep failed (%s: %s); trying again in %g s", type(exc).__name__, exc,
                               self.settings.control.job_sweep_interval_s)  # fmt: skip
            self._stop.wait(self.settings.control.job_sweep_interval_s)

    def sweep(self) -> list[uuid.UUID]:
        """One pass; returns the ids published again."""
        control, sessions = self.settings.control, self.sessions
        now = utcnow()
        queued_before = now - dt.timedelta(seconds=control.job_requeue_after_s)
        running_before = now - dt.timedelta(seconds=max(control.job_requeue_after_s, control.job_stale_after_s))
        candidates = store.unattended(sessions, queued_before=queued_before, running_before=running_before)
        if not candidates:
            return []
        in_broker = job_ids_in_broker(self.celery)
        lost: dict[uuid.UUID, str] = {}  # id → why it is published again
        for job_id, status in candidates:
            present = str(job_id) in in_broker
            if present and status == "running":
                continue  # a lost worker's task, handed back after the visibility timeout: leave the row stale
            before = queued_before if status == "queued" else running_before
            if not store.mark_swept(sessions, job_id, status, before):
                continue  # another sweeper took it this period, or it moved on
            if not present:
                waited = (now - before).total_seconds()
                lost[job_id] = (f"queued for over {waited:g} s" if status == "queued"
                                else f"running with no heartbeat for over {waited:g} s")  # fmt: skip
        if lost:
            self._republish(lost)
        return list(lost)

    def _republish(self, lost: dict[uuid.UUID, str]) -> None:
        error = publish(self.celery, [str(job_id) for job_id in lost])
        for job_id, why in lost.items():
            if error is None:
                logger.info("job %s re-published: %s and no message for it is left in Redis", job_id, why)
            else:
                logger.warning("job %s: re-publishing failed (%s: %s); a sweep tries again in %g s", job_id,
                               type(error).__name__, error, self.settings.control.job_requeue_after_s)  # fmt: skip
