"""What a job service receives: progress reporting, cooperative cancellation, and the errors that
tell the runner how a failure should be treated.

A service is a plain function `run(params, ctx) -> result dict`. It calls `ctx.progress(pct)` as
it goes and `ctx.check_cancelled()` between chunks of work (a download chunk, a tensor, a file);
the runner turns those into row updates and a clean `cancelled` status.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app.settings import Settings


class JobError(Exception):
    """A permanent failure: the job fails with this message, which must say what to change."""


class TransientJobError(JobError):
    """A failure worth retrying (a network blip, a 5xx): the runner retries with backoff."""


class JobCancelled(Exception):
    """Raised by `JobContext.check_cancelled` when the job's cancel flag is set."""


@dataclasses.dataclass
class JobContext:
    job_id: str
    settings: Settings
    report_progress: Callable[[float], None] = lambda pct: None
    cancel_requested: Callable[[], bool] = lambda: False
    # Progress writes are throttled: a row update per percent of a 10 GB download is wasteful.
    min_report_interval_s: float = 0.5
    _last_report: float = dataclasses.field(default=0.0, repr=False)
    _last_pct: float = dataclasses.field(default=-1.0, repr=False)
    _last_cancel_check: float = dataclasses.field(default=0.0, repr=False)

    def progress(self, percent: float) -> None:
        pct = max(0.0, min(100.0, float(percent)))
        now = time.monotonic()
        if pct >= 100.0 or now - self._last_report >= self.min_report_interval_s:
            if pct != self._last_pct:
                self.report_progress(pct)
                self._last_pct = pct
            self._last_report = now

    def check_cancelled(self) -> None:
        if self.cancel_requested():
            raise JobCancelled(f"job {self.job_id} was cancelled")


def staging_path(final: Path, job_id: str) -> Path:
    """The hidden sibling a job writes into before the rename that makes its output visible."""
    return final.parent / f".staging-{final.name}-{job_id}"


@contextmanager
def atomic_folder(final: Path, job_id: str, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success rename it to `final` in one step, so a reader
    never sees a half-written model or adapter. On any error (or a cancel) the staging folder is
    removed. A previous attempt's leftovers for the same job are cleared first (a redelivered task
    starts clean). With `replace`, an existing `final` is swapped out; without, it is an error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(final, job_id)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if final.exists():
            if not replace:
                raise JobError(f"{final} already exists; choose another name or remove it first")
            old = final.parent / f".old-{final.name}-{job_id}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
