"""The workers' Celery app, from the environment's settings (REDIS_URL, DATABASE_URL, time limits).

`celery -A workers.celery_app worker` works as well as `mxext worker`; MXEXT_VISIBILITY_TIMEOUT
(seconds, set by `mxext worker --visibility-timeout`) shortens the redelivery delay after a lost
worker, for tests; by default it is the hard time limit plus ten minutes.

Each worker process also runs the sweeper (app.jobs.sweeper), which publishes again the jobs whose
message was lost; Celery's worker signals start and stop it in the main process, whichever command
started the worker.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown

from app.jobs.celery_config import make_celery
from app.settings import get_settings

app = make_celery(get_settings(), include=("workers.tasks",))
_sweepers: list[Any] = []


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    from app.jobs.sweeper import Sweeper

    sweeper = Sweeper(get_settings(), app)
    sweeper.start()
    _sweepers.append(sweeper)


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    while _sweepers:
        _sweepers.pop().stop()
