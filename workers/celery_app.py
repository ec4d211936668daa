"""The workers' Celery app, from the environment's settings (REDIS_URL, DATABASE_URL, time limits).

`celery -A workers.celery_app worker` works as well as `mxext worker`; MXEXT_VISIBILITY_TIMEOUT
(seconds, set by `mxext worker --visibility-timeout`) shortens the redelivery delay after a lost
worker, for tests; by default it is the hard time limit plus ten minutes.
"""

from __future__ import annotations

from app.jobs.celery_config import make_celery
from app.settings import get_settings

app = make_celery(get_settings(), include=("workers.tasks",))
