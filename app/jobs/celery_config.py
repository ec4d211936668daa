"""The Celery configuration both sides share: the server sends `mxext.run_job` with it, the
workers (workers/celery_app.py) consume with it. Redis is broker and result backend."""

from __future__ import annotations

from typing import Any

from app.settings import Settings

TASK_NAME = "mxext.run_job"
QUEUE = "mxext-jobs"


def celery_config(settings: Settings, *, visibility_timeout_s: int | None = None) -> dict[str, Any]:
    control = settings.control
    if not control.redis_url:
        raise ValueError("REDIS_URL is not set: Celery needs Redis (redis://host:port/db) as its broker")
    visibility = visibility_timeout_s or control.visibility_timeout_s
    transport: dict[str, Any] = {"visibility_timeout": visibility}
    if visibility < 600:
        # A short timeout (tests, small deployments) is only useful if unacked tasks of a lost worker
        # are swept often; kombu's default sweep runs every ~100 s.
        transport.update(unacked_restore_interval=max(1, visibility // 4), unacked_restore_throttle=1)
    return {
        "broker_url": control.redis_url,
        "result_backend": control.redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": QUEUE,
        # A task is acknowledged only when it returns, and handed back if its worker dies: a lost
        # worker's job is redelivered, and the row's compare-and-set keeps a finished one finished.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": control.job_soft_time_limit_s,
        "task_time_limit": control.job_hard_time_limit_s,
        "result_expires": 24 * 3600,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
    }


def make_celery(settings: Settings, *, visibility_timeout_s: int | None = None, include: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """A Celery app for `settings` (celery is imported here, never by the embedded server)."""
    from celery import Celery

    app = Celery("mxext", include=list(include))
    app.conf.update(celery_config(settings, visibility_timeout_s=visibility_timeout_s))
    return app
