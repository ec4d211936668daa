"""The benchmark's metric arithmetic on hand-made timestamps (no network, no clock)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.serving.metrics import RequestResult, aggregate, is_good, summarize


def streamed(start: float, chunk_times: list[float], end: float, completion_tokens: int | None, prompt_tokens: int = 10,
             model: str = "m") -> RequestResult:  # fmt: skip
    r = RequestResult(model=model, start=start)
    for t in chunk_times:
        r.add_token_chunk(t, "x")
    r.end = end
    r.take_usage(None if completion_tokens is None else {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
    r.check_complete(streamed=True)
    return r


def test_per_request_definitions():
    r = streamed(10.0, [10.5, 10.6, 10.8, 11.1], 11.2, completion_tokens=8)
    assert r.success
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.1, 0.2, 0.3])
    assert r.latency == pytest.approx(1.2)
    # TPOT = (latency - TTFT) / (output tokens - 1), with the server's count (8), not the 4 chunks
    assert r.tpot == pytest.approx((1.2 - 0.5) / 7)
    assert r.tokens_per_second == pytest.approx(8 / 1.2)
    assert r.usage_source == "usage"


def test_single_token_has_no_tpot_and_no_itl():
    r = streamed(0.0, [0.3], 0.31, completion_tokens=1)
    assert r.tpot is None and r.itl == [] and r.ttft == pytest.approx(0.3)


def test_chunks_counted_only_without_usage():
    r = streamed(0.0, [0.1, 0.2, 0.3], 0.3, completion_tokens=None)
    assert r.completion_tokens == 3 and r.usage_source == "chunks"


def test_abort_and_empty_stream_are_failures():
    r = streamed(0.0, [0.1], 0.2, completion_tokens=1)
    r.finish_reason = "abort"
    r.success, r.error = True, None
    r.check_complete(streamed=True)
    assert not r.success and "abort" in r.error
    empty = streamed(0.0, [], 0.2, completion_tokens=5)
    assert not empty.success and "no output" in empty.error


def test_first_error_is_kept():
    r = RequestResult()
    r.fail("connection reset")
    r.fail("the stream ended before data: [DONE]")
    assert r.error == "connection reset"


def test_summarize_matches_numpy():
    values = [0.3, 0.1, 0.4, 0.15, 0.9, 0.26]
    s = summarize(values)
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["median"] == pytest.approx(0.28)
    assert s["p95"] == pytest.approx(np.percentile(values, 95))
    assert s["p99"] == pytest.approx(np.percentile(values, 99))
    assert (s["min"], s["max"]) == (0.1, 0.9)
    assert summarize([]) == dict.fromkeys(("mean", "median", "p95", "p99", "min", "max"))


def test_aggregate_exact():
    a = streamed(0.0, [0.2, 0.3, 0.5], 0.5, completion_tokens=3, prompt_tokens=10)
    b = streamed(0.1, [0.5, 0.6], 0.7, completion_tokens=4, prompt_tokens=20)
    c = RequestResult(model="m", start=0.2, end=0.25)
    c.fail("HTTP 500 Internal Server Error: boom")
    m = aggregate([a, b, c], duration=2.0)
    assert (m["total_requests"], m["successful_requests"], m["failed_requests"]) == (3, 2, 1)
    assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"]) == (30, 7, 37)
    assert m["ttft_mean"] == pytest.approx((0.2 + 0.4) / 2)
    assert m["ttft_median"] == pytest.approx(0.3)
    assert m["ttft_min"] == pytest.approx(0.2) and m["ttft_max"] == pytest.approx(0.4)
    tpots = [(0.5 - 0.2) / 2, (0.6 - 0.4) / 3]
    assert m["tpot_mean"] == pytest.approx(np.mean(tpots))
    itls = [0.1, 0.2, 0.1]
    assert m["itl_median"] == pytest.approx(np.median(itls))
    assert m["itl_p99"] == pytest.approx(np.percentile(itls, 99))
    assert m["e2e_mean"] == pytest.approx((0.5 + 0.6) / 2)
    assert m["tps_max"] == pytest.approx(max(3 / 0.5, 4 / 0.6))
    assert m["overall_throughput"] == pytest.approx(7 / 2.0)
    assert m["total_token_throughput"] == pytest.approx(37 / 2.0)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["errors"] == [{"error": "HTTP 500 Internal Server Error: boom", "count": 1}]
    assert m["usage_from_server"] is True
    for key in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean", "median", "p95", "p99", "min", "max"):
            assert f"{key}_{stat}" in m


def test_aggregate_all_failed_and_empty():
    bad = RequestResult(start=0.0, end=0.1)
    bad.fail("cannot connect")
    m = aggregate([bad], duration=0.1)
    assert m["failed_requests"] == 1 and m["overall_throughput"] == 0.0 and m["ttft_median"] is None


def test_goodput_like_vllm():
    fast = streamed(0.0, [0.1, 0.2], 0.2, completion_tokens=2)  # ttft 100 ms, tpot 100 ms, e2e 200 ms
    slow = streamed(0.0, [0.5, 0.6], 0.6, completion_tokens=2)  # ttft 500 ms
    one = streamed(0.0, [0.1], 0.1, completion_tokens=1)  # tpot counts as 0
    assert is_good(fast, {"ttft": 200, "tpot": 150, "e2el": 250})
    assert not is_good(slow, {"ttft": 200})
    assert is_good(one, {"tpot": 1})
    m = aggregate([fast, slow, one], duration=2.0, goodput={"ttft": 200})
    assert m["good_requests"] == 2 and m["goodput"] == pytest.approx(1.0)
    assert m["goodput_slos_ms"] == {"ttft": 200}


def test_per_model_breakdown():
    a = streamed(0.0, [0.1, 0.2], 0.2, completion_tokens=2, model="base")
    b = streamed(0.0, [0.3, 0.4], 0.4, completion_tokens=2, model="sql")
    m = aggregate([a, b], duration=1.0)
    assert set(m["per_model"]) == {"base", "sql"}
    assert m["per_model"]["sql"]["ttft_median"] == pytest.approx(0.3)
    assert "per_model" not in aggregate([a], duration=1.0)


def test_record_is_json_ready():
    r = streamed(5.0, [5.1, 5.3], 5.4, completion_tokens=2)
    rec = r.to_record(t0=5.0)
    assert rec["start"] == 0.0 and rec["ttft"] == pytest.approx(0.1) and rec["itl"] == [pytest.approx(0.2)]
    assert rec["tpot"] == pytest.approx(0.3) and rec["success"] is True and not math.isnan(rec["e2e"])
