"""Celery workers: `mxext worker` (or `celery -A workers.celery_app worker`). Tasks are thin and
call app.jobs.runner; the business logic lives in app/."""
