"""The load generator: warm-up, arrival schedule, concurrency limit, progress bar, sweep.

Arrivals follow vLLM's serving benchmark: with `--request-rate R` the gaps between request
arrivals are gamma-distributed with shape `--burstiness` and mean 1/R (shape 1: a Poisson
process; inf: evenly spaced), rescaled so the last arrival is at N/R s; with R = inf all arrive at
once. Each arrival then waits for one of `--concurrent-requests` slots. The benchmark's duration
is from the first arrival to the last request's end.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.serving.client import HTTPClient, HTTPError, send_request
from bench.serving.datasets import Sample, load_samples
from bench.serving.metrics import RequestResult, aggregate
from bench.serving.options import BenchOptions


class BenchError(RuntimeError):
    """The benchmark cannot run (server unreachable, misconfigured request); the message says why."""


@dataclass
class RunResult:
    concurrency: int
    results: list[RequestResult]
    duration: float
    t0: float
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each of n requests arrives."""
    if math.isinf(rate):
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        # numpy's legacy generator, as vLLM's benchmark draws them after np.random.seed(seed): the
        # same seed gives the same arrival times in both tools
        gaps = np.random.RandomState(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    if times[-1] > 0:
        times *= (n / rate) / times[-1]
    return times.tolist()


def client_for(opts: BenchOptions) -> HTTPClient:
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    return HTTPClient(opts.server_url, headers=headers)


async def _send(client: HTTPClient, opts: BenchOptions, sample: Sample, index: int) -> RequestResult:
    return await send_request(
        client, opts.endpoint, sample.model, sample.prompt, sample.output_len, opts.temperature, opts.stream,
        ignore_eos=opts.ignore_eos, timeout=opts.request_timeout, index=index, expected_prompt_tokens=sample.prompt_len,
    )  # fmt: skip


async def warm_up(client: HTTPClient, opts: BenchOptions, samples: list[Sample]) -> None:
    """Untimed requests first; one that fails means the run would be meaningless, so stop with its error."""
    for i in range(opts.num_warmups):
        result = await _send(client, opts, samples[i % len(samples)], -1 - i)
        if not result.success:
            raise BenchError(f"the warm-up request to {opts.server_url} failed: {result.error}")


async def run_level(
    client: HTTPClient, opts: BenchOptions, samples: list[Sample], concurrency: int, label: str = ""
) -> RunResult:
    """One timed run of all samples at a concurrency; Ctrl-C ends it early with what finished."""
    from tqdm import tqdm

    arrivals = arrival_times(len(samples), opts.request_rate, opts.burstiness, opts.seed)
    slots = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(samples), desc=label or f"concurrency {concurrency}", unit="req", file=sys.stderr,
               disable=not opts.progress, dynamic_ncols=True, leave=True)  # fmt: skip
    failures = 0
    results: list[RequestResult | None] = [None] * len(samples)

    async def one(i: int, sample: Sample) -> None:
        nonlocal failures
        async with slots:
            result = await _send(client, opts, sample, i)
        results[i] = result
        if not result.success:
            failures += 1
            bar.set_postfix(failed=failures, refresh=False)
        bar.update(1)

    t0 = time.perf_counter()
    tasks: list[asyncio.Task] = []
    interrupted = False
    try:
        for i, sample in enumerate(samples):
            delay = t0 + arrivals[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, sample)))
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        interrupted = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    end = time.perf_counter()
    bar.close()
    final: list[RequestResult] = []
    for i, result in enumerate(results):
        if result is None:  # never sent or cut by Ctrl-C
            result = RequestResult(index=i, model=samples[i].model, start=end, end=end)
            result.fail("interrupted before it finished")
        final.append(result)
    finished = [r.end for r in final if r.end is not None and r.success]
    duration = (max(finished) if finished else end) - t0
    run = RunResult(concurrency, final, duration, t0, interrupted=interrupted)
    run.metrics = aggregate(final, duration, opts.goodput)
    run.metrics["concurrent_requests"] = concurrency
    run.metrics["request_rate"] = "inf" if math.isinf(opts.request_rate) else opts.request_rate
    if interrupted:
        run.metrics["interrupted"] = True
    return run


async def wait_ready(client: HTTPClient, timeout: float) -> None:
    """Poll GET /health (then /v1/models, for servers without it) until 200, for up to `timeout` s."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        for path in ("/health", "/v1/models"):
            try:
                status, _ = await client.get_json(path, timeout=5.0)
            except (HTTPError, asyncio.TimeoutError) as exc:
                last = str(exc) or "timed out"
                break
            if status == 200:
                return
            last = f"{path} answered {status}"
            if status != 404:
                break
        if time.monotonic() >= deadline:
            raise BenchError(f"the server at {client.host}:{client.port} was not ready within {timeout:g} s ({last})")
        await asyncio.sleep(0.5)


async def run_benchmark(opts: BenchOptions) -> tuple[list[RunResult], list[Sample]]:
    """Load the workload, warm up, run every concurrency level; the client is closed at the end."""
    client = client_for(opts)
    try:
        if opts.ready_timeout > 0:
            await wait_ready(client, opts.ready_timeout)
        samples = await load_samples(opts, client)
        if not samples:
            raise BenchError("the workload is empty")
        await warm_up(client, opts, samples)
        runs = []
        levels = opts.sweep or [opts.concurrent_requests]
        for n, level in enumerate(levels):
            label = f"concurrency {level}" + (f" ({n + 1}/{len(levels)})" if len(levels) > 1 else "")
            run = await run_level(client, opts, samples, level, label)
            runs.append(run)
            if run.interrupted:
                break
        return runs, samples
    finally:
        await client.close()
