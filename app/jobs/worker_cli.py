"""`mxext worker`: a Celery worker for the job queue (needs REDIS_URL; embedded mode needs none)."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("worker", help="run a Celery worker for jobs (needs REDIS_URL and DATABASE_URL)")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs run at once (default 1)")
    parser.add_argument("--pool", default="prefork", choices=("prefork", "threads", "solo"), help="Celery pool (default prefork)")
    parser.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)")
    parser.add_argument("--hostname", default=None, help="the worker's name (default celery's: mxext@<host>)")
    parser.add_argument("--visibility-timeout", type=int, default=None,
                        help="seconds before a lost worker's task is redelivered (default: hard time limit + 600)")  # fmt: skip
    parser.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from app.settings import get_settings

    try:
        settings = get_settings()
    except ValueError as exc:  # a bad MXEXT_* value: the message says which and what to use
        print(f"mxext worker: {exc}", file=sys.stderr)
        return 2
    if not settings.control.redis_url:
        print("mxext worker: REDIS_URL is not set. Workers take jobs from Redis: set REDIS_URL=redis://host:6379/0 "
              "(and DATABASE_URL=postgresql://user@host/db). Without them `mxext serve` runs jobs in-process "
              "and needs no worker.", file=sys.stderr)  # fmt: skip
        return 2
    if not settings.control.database_url:
        print("mxext worker: DATABASE_URL is not set; a worker needs the server's database "
              "(postgresql://user@host/db) to read and update jobs", file=sys.stderr)  # fmt: skip
        return 2
    if args.concurrency < 1:
        print("mxext worker: --concurrency must be at least 1", file=sys.stderr)
        return 2
    if args.visibility_timeout is not None:
        if args.visibility_timeout < 1:
            print("mxext worker: --visibility-timeout must be at least 1 second", file=sys.stderr)
            return 2
        os.environ["MXEXT_VISIBILITY_TIMEOUT"] = str(args.visibility_timeout)  # for prefork children too
        get_settings.cache_clear()  # the Celery app below reads the settings again, with it
        try:
            get_settings()
        except ValueError as exc:  # e.g. a heartbeat too long for this timeout
            print(f"mxext worker: --visibility-timeout {args.visibility_timeout}: {exc}", file=sys.stderr)
            return 2
    from workers.celery_app import app

    argv = ["worker", f"--concurrency={args.concurrency}", f"--pool={args.pool}", f"--loglevel={args.loglevel}",
            "--without-gossip", "--without-mingle"]  # fmt: skip
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0
