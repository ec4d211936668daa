"""The benchmark against a scripted OpenAI-compatible server (bench/serving/fakeserver.py) in-process.

The fake server sleeps known intervals between chunks and records when each request arrived and
when it wrote each chunk, on the same clock as the client. The measured TTFT/ITL/E2E are checked,
tightly, against what the server actually did (on a busy machine its sleeps overshoot by tens of
ms, which the benchmark must measure, not hide); that the server roughly kept to its script is a
separate, loose check of the fake server. TPOT, throughput and the aggregates are checked against
their definitions.

What may lie between the client's numbers and the server's is the way of the request and of each
chunk through the loopback and the event loop, well under a millisecond, unless the OS has this
(single) thread wait for a CPU meanwhile: on a loaded 2-core machine, 5 to 20 ms at a time.
`StallClock` reads that wait from the kernel at every timestamp, and the checks leave out what it
measured inside those ways (only there: the server's intervals, stalls and all, are the truth the
client must match).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

import numpy as np
import pytest

from bench.serving import client as bench_client
from bench.serving import fakeserver, runner
from bench.serving.cli import main
from bench.serving.config_runner import run_config
from bench.serving.datasets import Sample
from bench.serving.fakeserver import Exchange, FakeOpenAIServer, Script
from bench.serving.metrics import RequestResult
from bench.serving.options import BenchOptions
from bench.serving.report import parse_log
from bench.serving.runner import BenchError, RunResult, run_benchmark

# Tool against server: the client's measurement minus the server's recorded interval is the
# request's and the answer's way through the loopback and the event loop (less the thread's waits
# for a CPU on that way), >= 0 and small.
TOL = 0.012  # s: TTFT / E2E (request transit + chunk transit)
TRANSIT = 0.005  # s: one chunk, written by the server -> read by the client
# Server against script (a check of the fake server only): sleeps never end early (bar clock
# rounding) and overshoot by however long the machine is busy.
EARLY = 0.002
SCRIPT_SLACK = 0.1


def _run_queue_wait() -> int:
    """ns this thread has spent ready to run while the OS ran something else (0 where unknown)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


class StallClock:
    """Stands in for the `time` module of the client, the runner and the fake server: the same
    perf_counter() values, each noted with the run-queue wait of the thread (which they share) just
    before and just after it was read."""

    def __init__(self) -> None:
        self._times: list[float] = []  # in order: one thread, a monotonic clock
        self._waits: list[tuple[int, int]] = []

    def __getattr__(self, name: str):
        return getattr(time, name)

    def perf_counter(self) -> float:
        before = _run_queue_wait()
        now = time.perf_counter()
        self._times.append(now)
        self._waits.append((before, _run_queue_wait()))
        return now

    def stalled(self, a: float, b: float) -> float:
        """s the thread surely waited for a CPU between times a and b (from the first reading at or
        after a to the last at or before b; nothing outside [a, b] counts)."""
        i, j = bisect_left(self._times, a), bisect_right(self._times, b) - 1
        return max(0, self._waits[j][0] - self._waits[i][1]) / 1e9 if i < j else 0.0

    def last_reading_before(self, t: float) -> float:
        return self._times[bisect_right(self._times, t) - 1]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[StallClock]:
    """The stall-noting clock, with Python's cyclic collector paused. The tool and the fake server
    share this process, and in a whole-suite process a full collection takes 15-46 ms (measured
    with gc.callbacks), longer than the tolerances: one landing between the server's last write and
    the tool's last read was added to the tool's run and failed the check. The tool's own process
    holds a fraction of those objects; what is tested here is its arithmetic, not our GC."""
    clock = StallClock()
    for module in (bench_client, runner, fakeserver):
        monkeypatch.setattr(module, "time", clock)
    gc.collect()
    gc.disable()
    try:
        yield clock
    finally:
        gc.enable()


def options(server: FakeOpenAIServer, **kw) -> BenchOptions:
    base = dict(model="fake", server_url=server.url, num_prompts=4, concurrent_requests=2, progress=False, num_warmups=0)
    base.update(kw)
    return BenchOptions(**base).check()


def prompt_of(request: dict) -> str:
    return request["messages"][-1]["content"] if "messages" in request else request["prompt"]


def exchanges_of(
    server: FakeOpenAIServer, run: RunResult, samples: list[Sample]
) -> list[tuple[RequestResult, Exchange]]:
    """Each result with the server's record of the same request, paired by their (distinct) prompts."""
    by_prompt = {prompt_of(e.request): e for e in server.exchanges}
    assert len(by_prompt) == len(server.exchanges) == len(run.results)
    return [(r, by_prompt[samples[r.index].prompt]) for r in run.results]


def assert_kept_to(took: float, scripted: float) -> None:
    """The fake server's interval is roughly the scripted one (late by any scheduling hiccup)."""
    assert scripted - EARLY <= took < scripted + SCRIPT_SLACK, f"the fake server took {took:.4f} s, scripted {scripted:g} s"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_stream_timings_match_the_script(endpoint, clock):
    script = Script(ttft=0.12, gaps=[0.03, 0.05, 0.02, 0.04], tokens_per_chunk=3, prompt_tokens=11)
    async with FakeOpenAIServer(script) as server:
        runs, samples = await run_benchmark(options(server, endpoint=endpoint))
    run = runs[0]
    assert len(run.results) == 4 and all(r.success for r in run.results)
    assert all(req["stream_options"] == {"include_usage": True} for req in server.requests)
    for r, ex in exchanges_of(server, run, samples):
        # what the tool measured is what the server did: the request went out before the server
        # read it, and each chunk arrived right after the server wrote it (so each ITL is the
        # server's gap to within TRANSIT)
        assert r.start <= ex.received
        assert len(ex.chunks) == 5 and len(r.itl) == len(script.gaps)
        arrived = r.first_token + np.concatenate([[0.0], np.cumsum(r.itl)])
        for wrote, seen in zip(ex.chunks, arrived):
            assert 0 <= seen - wrote - clock.stalled(wrote, seen) < TRANSIT
        # chat's role-only chunk (written at once) is not the first token
        way = clock.stalled(r.start, ex.received) + clock.stalled(ex.chunks[0], r.first_token)
        assert 0 <= r.ttft - (ex.chunks[0] - ex.received) - way < TOL
        way = clock.stalled(r.start, ex.received) + clock.stalled(ex.end, r.end)
        assert 0 <= r.latency - (ex.end - ex.received) - way < TOL
        # and the server kept (roughly) to its script
        assert_kept_to(ex.chunks[0] - ex.received, script.ttft)
        for wrote, slept in zip(np.diff(ex.chunks), script.gaps):
            assert_kept_to(wrote, slept)
        assert_kept_to(ex.end - ex.received, script.ttft + sum(script.gaps))
        # token counts are the server's usage (3 a chunk), not the 5 chunks
        assert r.completion_tokens == 15 and r.prompt_tokens == 11 and r.usage_source == "usage"
        assert r.tpot == (r.latency - r.ttft) / 14
        assert r.tokens_per_second == 15 / r.latency
    m = run.metrics
    assert (m["total_requests"], m["failed_requests"], m["completion_tokens"], m["prompt_tokens"]) == (4, 0, 60, 44)
    assert m["ttft_median"] == float(np.median([r.ttft for r in run.results]))
    assert m["itl_p99"] == float(np.percentile([x for r in run.results for x in r.itl], 99))
    assert m["overall_throughput"] == 60 / run.duration
    # 4 requests, 2 at a time: never more than 2 at the server at once, so two waves of ~0.26 s
    events = sorted([(e.received, 1) for e in server.exchanges] + [(e.end, -1) for e in server.exchanges])
    assert max(np.cumsum([step for _, step in events])) == 2
    first, last = min(e.received for e in server.exchanges), max(e.end for e in server.exchanges)
    way = clock.stalled(run.t0, first) + clock.stalled(last, max(r.end for r in run.results))
    assert 0 <= run.duration - (last - first) - way < TOL
    assert_kept_to(last - first, 2 * (script.ttft + sum(script.gaps)))


async def test_not_streamed(clock):
    script = Script(ttft=0.05, gaps=[0.05, 0.05])
    async with FakeOpenAIServer(script) as server:
        runs, samples = await run_benchmark(options(server, stream=False, endpoint="chat"))
    for r, ex in exchanges_of(server, runs[0], samples):
        assert r.success and r.ttft is None and r.tpot is None and r.itl == []
        assert r.completion_tokens == 3 and not r.streamed
        way = clock.stalled(r.start, ex.received) + clock.stalled(ex.end, r.end)
        assert r.start <= ex.received and 0 <= r.latency - (ex.end - ex.received) - way < TOL
        assert_kept_to(ex.end - ex.received, 0.15)
    assert runs[0].metrics["ttft_median"] is None and runs[0].metrics["e2e_median"] > 0.15
    assert "stream_options" not in server.requests[0]


async def test_server_without_usage_counts_chunks():
    async with FakeOpenAIServer(Script(ttft=0.01, gaps=[0.01], tokens_per_chunk=4, omit_usage=True)) as server:
        runs, _ = await run_benchmark(options(server, num_prompts=2))
    assert {r.completion_tokens for r in runs[0].results} == {2}
    assert runs[0].metrics["usage_from_server"] is False


async def test_http_errors_are_counted():
    async with FakeOpenAIServer(Script(status=500)) as server:
        runs, _ = await run_benchmark(options(server))
    m = runs[0].metrics
    assert (m["failed_requests"], m["successful_requests"]) == (4, 0)
    assert m["errors"] == [{"error": "HTTP 500 X: scripted failure", "count": 4}]


async def test_warm_up_failure_stops_the_run():
    async with FakeOpenAIServer(Script(status=404)) as server:
        with pytest.raises(BenchError, match="warm-up.*HTTP 404"):
            await run_benchmark(options(server, num_warmups=1))


async def test_server_dying_mid_run():
    """The server stops after 10 chunks: what finished is reported, the rest are failures."""
    script = Script(ttft=0.02, gaps=[0.02] * 3, die_after_chunks=10)  # 4 chunks a request
    async with FakeOpenAIServer(script) as server:
        runs, _ = await run_benchmark(options(server, num_prompts=8, concurrent_requests=1))
    m = runs[0].metrics
    assert m["total_requests"] == 8
    assert m["successful_requests"] == 2  # 8 chunks sent in full, the third request cut after 2
    assert m["failed_requests"] == 6
    messages = " ".join(e["error"] for e in m["errors"])
    assert "cannot connect" in messages and ("closed" in messages or "lost" in messages or "reset" in messages.lower())
    assert m["completion_tokens"] == 8 and m["ttft_median"] is not None


async def test_request_rate_spreads_arrivals(clock):
    async with FakeOpenAIServer(Script(ttft=0.005, gaps=[])) as server:
        runs, _ = await run_benchmark(options(server, num_prompts=6, concurrent_requests=6, request_rate=10.0,
                                              burstiness=math.inf))  # fmt: skip
    t0, results = runs[0].t0, sorted(runs[0].results, key=lambda r: r.index)
    # each sent when due, late by no more than the OS then had this thread wait for a CPU (counted
    # from the clock's last reading before it was due: the thread sleeps in between, no wait for a CPU)
    due = [t0 + 0.1 * (r.index + 1) for r in results]
    starts = [r.start - clock.stalled(clock.last_reading_before(d), r.start) - t0 for r, d in zip(results, due)]
    assert starts == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], abs=0.02)


async def test_lora_mix_and_api_key():
    async with FakeOpenAIServer(Script(ttft=0.005, gaps=[0.005]), api_key="k") as server:
        runs, _ = await run_benchmark(options(server, num_prompts=40, concurrent_requests=8, api_key="k",
                                              lora={"sql": 1, "fake": 1}))  # fmt: skip
        with pytest.raises(BenchError, match="401"):
            await run_benchmark(options(server, num_warmups=1))
    models = [req["model"] for req in server.requests]
    assert set(models) == {"sql", "fake"}
    assert set(runs[0].metrics["per_model"]) == {"sql", "fake"}


async def test_random_dataset_through_the_server_tokenizer():
    async with FakeOpenAIServer(Script(ttft=0.005, gaps=[0.005])) as server:
        runs, samples = await run_benchmark(options(server, dataset="random", input_len=20, output_len=6,
                                                    endpoint="completions", ignore_eos=True))  # fmt: skip
    assert all(len(s.prompt.split()) == 20 and s.output_len == 6 for s in samples)
    assert all(req["max_tokens"] == 6 and req["ignore_eos"] is True for req in server.requests)


# ---- the command line (asyncio.run inside, so the server runs in a thread) -----------------------


@contextlib.contextmanager
def threaded_server(script: Script) -> Iterator[FakeOpenAIServer]:
    loop = asyncio.new_event_loop()
    server = FakeOpenAIServer(script)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_cli_json_log_and_chart(tmp_path, capsys):
    with threaded_server(Script(ttft=0.02, gaps=[0.01, 0.01])) as server:
        code = main(["--model", "fake", "--server-url", server.url, "--num-prompts", "6", "--concurrent-requests", "3",
                     "--json", "--log-dir", str(tmp_path), "--save-individual", "--no-progress", "--lang", "zh"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    metrics = json.loads(out)
    for key in ("total_requests", "failed_requests", "total_tokens", "prompt_tokens", "completion_tokens",
                "ttft_mean", "ttft_median", "ttft_p95", "ttft_p99", "tpot_mean", "tpot_median", "tpot_p95",
                "tpot_p99", "itl_mean", "itl_median", "itl_p95", "itl_p99", "e2e_mean", "e2e_median", "e2e_p95",
                "e2e_p99", "overall_throughput"):  # fmt: skip
        assert key in metrics
    assert metrics["total_requests"] == 6 and metrics["completion_tokens"] == 18
    assert "测试摘要" in err and "首字延迟 (TTFT)" in err  # the report goes to stderr with --json
    logs = list(tmp_path.glob("mim_profile_*.log"))
    assert len(logs) == 1 and logs[0].with_suffix(".png").stat().st_size > 10_000
    log = parse_log(logs[0])
    assert {k: log["aggregate"][k] for k in metrics} == metrics  # the same keys and values as --json
    assert "Summary" in log["report"] and len(log["requests"]) == 6


def test_cli_sweep(tmp_path, capsys):
    with threaded_server(Script(ttft=0.01, gaps=[0.01])) as server:
        code = main(["--model", "fake", "--server-url", server.url, "--num-prompts", "4", "--sweep", "1,2,4",
                     "--log-dir", str(tmp_path), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "Concurrency Sweep" in out and out.count("Serving Benchmark Result") == 3
    log = parse_log(next(tmp_path.glob("mim_profile_*.log")))
    assert [m["concurrent_requests"] for m in log["aggregate"]["sweep"]] == [1, 2, 4]
    assert next(tmp_path.glob("mim_profile_*.png")).stat().st_size > 10_000


def test_cli_exit_codes(tmp_path, capsys):
    with threaded_server(Script(ttft=0.01, gaps=[0.01] * 3, die_after_chunks=6)) as server:
        code = main(["--model", "fake", "--server-url", server.url, "--num-prompts", "5", "--no-save", "--no-progress",
                     "--num-warmups", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 2 and "Failed requests:                        4" in out
    assert main(["--model", "fake", "--server-url", "http://127.0.0.1:9", "--no-save", "--no-progress"]) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert main(["--server-url", "http://127.0.0.1:9"]) == 1


def test_config_runner(tmp_path):
    with threaded_server(Script(ttft=0.01, gaps=[0.01])) as server:
        (tmp_path / "prompts.txt").write_text("first\nsecond\n")
        data = {
            "server": {"url": server.url, "model": "fake", "endpoint": "completions"},
            "test_params": {"num_prompts": 3, "max_tokens": 5, "temperature": 0.0, "concurrent_requests": 2},
            "prompts": {"file": "prompts.txt"},
            "output": {"log_dir": str(tmp_path / "logs"), "save_individual": True, "plot": False},
        }
        result = run_config(data, base_dir=tmp_path)
        prompts = [req["prompt"] for req in server.requests]
    assert result["exit_code"] == 0 and result["aggregate"]["successful_requests"] == 3 and result["plot_file"] is None
    assert prompts[-3:] == ["first", "second", "first"] and {req["max_tokens"] for req in server.requests} == {5}
    assert len(parse_log(result["log_file"])["requests"]) == 3
