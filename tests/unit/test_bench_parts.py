"""Pieces of the benchmark without a server: SSE parsing, arrivals, datasets, report and log file."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from bench.serving.client import SSEParser, build_payload
from bench.serving.datasets import (
    DEFAULT_PROMPTS,
    assign_models,
    fit_to_length,
    prompt_samples,
    random_samples,
    sharegpt_samples,
)
from bench.serving.metrics import RequestResult, aggregate
from bench.serving.options import BenchOptions, OptionError
from bench.serving.report import format_report, format_sweep, log_path, parse_log, write_log
from bench.serving.runner import arrival_times


# ---- SSE and payloads -------------------------------------------------------------------------


def test_sse_parser_splits_across_pieces():
    p = SSEParser()
    assert p.feed(b'data: {"a": 1}\n\nda') == ['{"a": 1}']
    assert p.feed(b"ta: [DONE]") == []
    assert p.feed(b"\n\n: comment\n\ndata: x\r\n\r\n") == ["[DONE]", "x"]
    assert p.pending == b""


def test_payloads():
    path, body = build_payload("chat", "m", "hi", 5, 0.0, True, ignore_eos=True)
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    path, body = build_payload("completions", "m", "hi", 5, 0.7, False)
    assert path == "/v1/completions" and body["prompt"] == "hi" and "stream_options" not in body


# ---- arrivals ---------------------------------------------------------------------------------


def test_arrivals():
    assert arrival_times(4, math.inf, 1.0, 0) == [0.0] * 4
    even = arrival_times(4, 2.0, math.inf, 0)
    assert even == pytest.approx([0.5, 1.0, 1.5, 2.0])
    poisson = arrival_times(50, 10.0, 1.0, 3)
    assert poisson[-1] == pytest.approx(5.0) and poisson == sorted(poisson)
    assert poisson == arrival_times(50, 10.0, 1.0, 3) and poisson != arrival_times(50, 10.0, 1.0, 4)
    # vLLM's get_request: np.random.seed(seed), one np.random.gamma draw per request, cumsum, rescale
    np.random.seed(5)
    vllm = np.cumsum([np.random.gamma(shape=0.7, scale=1 / (20 * 0.7)) for _ in range(12)])
    assert arrival_times(12, 20.0, 0.7, 5) == pytest.approx((vllm * (12 / 20) / vllm[-1]).tolist(), abs=1e-12)
    gaps_bursty = np.diff(arrival_times(2000, 10.0, 0.2, 0))
    gaps_steady = np.diff(arrival_times(2000, 10.0, 5.0, 0))
    assert gaps_bursty.std() > 3 * gaps_steady.std()  # gamma shape k: CV = 1/sqrt(k)


# ---- datasets ---------------------------------------------------------------------------------


class WordTokenizer:
    """Token id = index of a word; words w90..w99 re-encode as two tokens (as BPE merges can differ)."""

    def __init__(self) -> None:
        self.words = [f"w{i}" for i in range(100)]

    async def encode(self, text):
        out = []
        for word in text.split():
            n = int(word[1:])
            out += [n] if n < 90 else [n - 80, n - 80]
        return out

    async def decode(self, ids):
        return " ".join(self.words[i] for i in ids)

    async def num_special_tokens(self):
        return 1

    async def allowed_tokens(self):
        return np.arange(2, 100)

    def offset_range(self):
        return 100

    def extra_tokens(self, rng, count):
        return rng.integers(2, 100, size=count).tolist()


async def test_random_dataset_has_exact_lengths():
    opts = BenchOptions(model="m", dataset="random", num_prompts=20, input_len=17, output_len=5, range_ratio=0.5,
                        endpoint="completions", seed=1)  # fmt: skip
    tok = WordTokenizer()
    samples = await random_samples(opts, tok)
    assert len(samples) == 20
    for s in samples:
        assert len(await tok.encode(s.prompt)) + 1 == s.prompt_len  # + the special token the server adds
        assert 2 <= s.output_len <= 8  # floor(5 * 0.5) .. ceil(5 * 1.5)
    again = await random_samples(opts, tok)
    assert [s.prompt for s in again] == [s.prompt for s in samples]


async def test_fit_to_length_cuts_and_tops_up():
    tok = WordTokenizer()
    text, n = await fit_to_length(tok, [95, 96, 97], 4, np.random.default_rng(0))
    assert n == 4 and len(await tok.encode(text)) == 4
    text, n = await fit_to_length(tok, [5], 6, np.random.default_rng(0))
    assert n == 6


def test_prompt_samples_cycle(tmp_path):
    assert [s.prompt for s in prompt_samples(BenchOptions(model="m", num_prompts=12))][10:] == DEFAULT_PROMPTS[:2]
    f = tmp_path / "p.txt"
    f.write_text("a\n\n  b  \n")
    samples = prompt_samples(BenchOptions(model="m", num_prompts=3, prompts_file=str(f), max_tokens=7))
    assert [s.prompt for s in samples] == ["a", "b", "a"] and {s.output_len for s in samples} == {7}
    assert [s.prompt for s in prompt_samples(BenchOptions(model="m", num_prompts=2, prompts=["x"]))] == ["x", "x"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(OptionError, match="no prompts"):
        prompt_samples(BenchOptions(model="m", prompts_file=str(tmp_path / "empty.txt")))


async def test_sharegpt(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "w2 w3 w4 w5 w6"}, {"from": "gpt", "value": "w7 w8 w9 w10"}]},
        {"conversations": [{"from": "human", "value": "w2"}, {"from": "gpt", "value": "w7 w8 w9 w10"}]},  # too short
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "w2 w3 w4 w5"}, {"from": "gpt", "value": "w1 w1 w1 w1 w1"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    samples = await sharegpt_samples(BenchOptions(model="m", dataset="sharegpt", dataset_path=str(path), num_prompts=5), WordTokenizer())
    assert sorted((s.prompt_len, s.output_len) for s in samples) == [(4, 5), (5, 4)]
    fixed = await sharegpt_samples(BenchOptions(model="m", dataset_path=str(path), num_prompts=1, output_len=9), WordTokenizer())
    assert len(fixed) == 1 and fixed[0].output_len == 9


def test_lora_mix_follows_weights():
    samples = prompt_samples(BenchOptions(model="base", num_prompts=4000))
    assign_models(samples, "base", {"a": 3, "b": 1}, seed=0)
    share = sum(s.model == "a" for s in samples) / len(samples)
    assert 0.72 < share < 0.78 and {s.model for s in samples} == {"a", "b"}
    assign_models(samples, "base", None, seed=0)
    assert {s.model for s in samples} == {"base"}


# ---- report and log file ----------------------------------------------------------------------


def fake_run(concurrency: int = 2):
    results = []
    for i in range(3):
        r = RequestResult(index=i, model="m", start=0.0)
        for t in (0.1 * (i + 1), 0.1 * (i + 1) + 0.05, 0.1 * (i + 1) + 0.1):
            r.add_token_chunk(t, "x")
        r.end = 0.1 * (i + 1) + 0.1
        r.take_usage({"prompt_tokens": 5, "completion_tokens": 3})
        r.check_complete(streamed=True)
        results.append(r)
    bad = RequestResult(index=3, model="m", start=0.0, end=0.01)
    bad.fail("cannot connect to 127.0.0.1:9: Connection refused")
    results.append(bad)
    metrics = aggregate(results, 1.0)
    metrics["concurrent_requests"] = concurrency
    return SimpleNamespace(concurrency=concurrency, results=results, duration=1.0, t0=0.0, metrics=metrics)


def test_report_sections_en_and_zh():
    opts = BenchOptions(model="m")
    run = fake_run()
    en = format_report(opts, run.metrics, 2, "en")
    for heading in ("Summary", "Time to First Token (TTFT)", "Time per Output Token", "Inter-token Latency (ITL)",
                    "End-to-end Latency", "Throughput", "Failed requests"):  # fmt: skip
        assert heading in en
    assert "Connection refused" in en and "Failed requests:" in en
    zh = format_report(opts, run.metrics, 2, "zh")
    for heading in ("测试摘要", "首字延迟 (TTFT)", "每输出词元时间 (TPOT", "词间延迟 (ITL)", "端到端延迟", "吞吐量", "失败请求"):
        assert heading in zh
    no_stream = format_report(BenchOptions(model="m", stream=False), run.metrics, 2, "en")
    assert "n/a (not streamed)" in no_stream
    sweep = format_sweep([fake_run(1).metrics, fake_run(4).metrics])
    assert "Concurrency Sweep" in sweep and len(sweep.splitlines()) == 5


def test_log_file_round_trip(tmp_path):
    opts = BenchOptions(model="m", api_key="secret", save_individual=True)
    run = fake_run()
    path = log_path(tmp_path, when=0)
    assert path.name.startswith("mim_profile_") and path.suffix == ".log" and len(path.stem) == len("mim_profile_YYYYMMDD_HHMMSS")
    write_log(path, opts, [run], "REPORT TEXT", started=0)
    assert log_path(tmp_path, when=0).name.endswith("_1.log")  # taken: a suffix
    text = path.read_text()
    assert "secret" not in text
    log = parse_log(path)
    assert log["config"]["model"] == "m" and log["config"]["api_key"] == "***"
    assert log["report"] == "REPORT TEXT"
    assert log["aggregate"]["failed_requests"] == 1 and log["aggregate"]["total_requests"] == 4
    assert len(log["requests"]) == 4 and log["requests"][3]["success"] is False
    opts.save_individual = False
    write_log(path, opts, [run, fake_run(4)], "R", started=0)
    log = parse_log(path)
    assert [m["concurrent_requests"] for m in log["aggregate"]["sweep"]] == [2, 4] and log["requests"] == []
