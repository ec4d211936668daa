"""A job kind for the tests only (MXEXT_EXTRA_JOB_KINDS=tests.integration.slow_job_kind:SLOW): it
writes a model-like folder through atomic_folder one step at a time, slowly, so a test can kill
its worker or cancel it mid-way. Each completed run appends a line to <store>/slow-kind.log."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from app.jobs.context import JobContext, atomic_folder
from app.jobs.kinds import JobKind, _record_artifact


class SlowParams(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    steps: int = 10
    step_s: float = 0.5


def run_slow(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    final = ctx.settings.store.models_dir / params["name"]
    with atomic_folder(final, ctx.job_id) as staging:
        for step in range(params["steps"]):
            ctx.check_cancelled()
            (staging / f"part-{step}.bin").write_bytes(b"x" * 1024)
            ctx.progress(100.0 * (step + 1) / params["steps"])
            time.sleep(params["step_s"])
        ctx.check_cancelled()
    with open(ctx.settings.store.home / "slow-kind.log", "a") as log:
        log.write(f"{ctx.job_id} done\n")
    return {"path": str(final), "format": "test", "steps": params["steps"]}


SLOW = JobKind("test-slow", "test-slow", SlowParams, lambda p: None, run_slow, _record_artifact)
