"""The benchmark against a scripted OpenAI-compatible server (bench/serving/fakeserver.py) in-process.

The fake server sleeps known intervals between chunks and records when it wrote each one, on the
same clock as the client, so the measured TTFT/ITL can be checked against what was sent, and
TPOT, throughput and the aggregates against their definitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from bench.serving.cli import main
from bench.serving.config_runner import run_config
from bench.serving.fakeserver import FakeOpenAIServer, Script
from bench.serving.options import BenchOptions
from bench.serving.report import parse_log
from bench.serving.runner import BenchError, run_benchmark

TOL = 0.012  # s: scheduling slack on a loaded 2-core machine (sleeps only ever overshoot)


def options(server: FakeOpenAIServer, **kw) -> BenchOptions:
    base = dict(model="fake", server_url=server.url, num_prompts=4, concurrent_requests=2, progress=False, num_warmups=0)
    base.update(kw)
    return BenchOptions(**base).check()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_stream_timings_match_the_script(endpoint):
    script = Script(ttft=0.12, gaps=[0.03, 0.05, 0.02, 0.04], tokens_per_chunk=3, prompt_tokens=11)
    async with FakeOpenAIServer(script) as server:
        runs, _ = await run_benchmark(options(server, endpoint=endpoint))
    run = runs[0]
    assert len(run.results) == 4 and all(r.success for r in run.results)
    assert all(req["stream_options"] == {"include_usage": True} for req in server.requests)
    # which request wrote which chunks: match by the first chunk's time
    sent = sorted(server.sent, key=lambda t: t[0])
    for r in sorted(run.results, key=lambda r: r.first_token):
        times = sent.pop(0)
        assert 0 <= r.first_token - times[0] < 0.005  # arrival right after the server wrote it
        # chat's role-only chunk (sent at once) is not the first token
        assert script.ttft <= r.ttft < script.ttft + TOL
        assert len(r.itl) == len(script.gaps)
        for measured, slept, wrote in zip(r.itl, script.gaps, np.diff(times)):
            assert slept <= measured + 0.002 and abs(measured - wrote) < 0.005
        # token counts are the server's usage (3 a chunk), not the 5 chunks
        assert r.completion_tokens == 15 and r.prompt_tokens == 11 and r.usage_source == "usage"
        assert r.tpot == (r.latency - r.ttft) / 14
        expected = script.ttft + sum(script.gaps)
        assert expected <= r.latency < expected + 2 * TOL
        assert r.tokens_per_second == 15 / r.latency
    m = run.metrics
    assert (m["total_requests"], m["failed_requests"], m["completion_tokens"], m["prompt_tokens"]) == (4, 0, 60, 44)
    assert m["ttft_median"] == float(np.median([r.ttft for r in run.results]))
    assert m["itl_p99"] == float(np.percentile([x for r in run.results for x in r.itl], 99))
    assert m["overall_throughput"] == 60 / run.duration
    # 4 requests, 2 at a time, each ~0.26 s: two waves
    assert 2 * (script.ttft + sum(script.gaps)) <= run.duration < 2 * (script.ttft + sum(script.gaps)) + 4 * TOL


async def test_not_streamed():
    script = Script(ttft=0.05, gaps=[0.05, 0.05])
    async with FakeOpenAIServer(script) as server:
        runs, _ = await run_benchmark(options(server, stream=False, endpoint="chat"))
    r = runs[0].results[0]
    assert r.success and r.ttft is None and r.tpot is None and r.itl == []
    assert 0.15 <= r.latency < 0.15 + TOL and r.completion_tokens == 3 and not r.streamed
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


async def test_request_rate_spreads_arrivals():
    async with FakeOpenAIServer(Script(ttft=0.005, gaps=[])) as server:
        runs, _ = await run_benchmark(options(server, num_prompts=6, concurrent_requests=6, request_rate=10.0,
                                              burstiness=math.inf))  # fmt: skip
    starts = sorted(r.start - runs[0].t0 for r in runs[0].results)
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
