"""The benchmark job: the performance tester (bench.serving) run against a server from a worker.

The tester is not cancellable mid-run: a cancel takes effect when the run ends (its results are
then dropped and the job reads cancelled).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from app.jobs.context import JobContext, JobError


def run_benchmark_job(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Run `params["config"]` (the tester's YAML mapping); returns {aggregate, log_file, plot_file, exit_code, output_dir}."""
    from bench.serving.config_runner import run_config
    from bench.serving.options import OptionError

    config = copy.deepcopy(params["config"])
    output = config.setdefault("output", {}) or {}
    config["output"] = output
    output_dir = output.get("log_dir") or str(ctx.settings.store.home / "benchmarks" / ctx.job_id)
    output.setdefault("log_dir", output_dir)
    output.setdefault("plot", False)
    output["json"] = False
    output["progress"] = False
    ctx.check_cancelled()
    ctx.progress(1.0)
    try:
        result = run_config(config)
    except OptionError as exc:
        raise JobError(f"config: {exc}") from None
    ctx.check_cancelled()
    return {
        "aggregate": json_safe(result.get("aggregate")),
        "log_file": result.get("log_file"),
        "plot_file": result.get("plot_file"),
        "exit_code": result.get("exit_code", 0),
        "output_dir": output_dir,
    }


def json_safe(value: Any) -> Any:
    """Plain JSON values: non-finite floats become None (JSONB refuses NaN), other objects strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
