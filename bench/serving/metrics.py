"""Per-request measurements and their aggregate.

Definitions (times from `time.perf_counter()`, all in seconds):

* start: just before the request is written to the socket.
* TTFT: arrival of the first chunk that carries output text (a chat role-only chunk or a
  finish-only chunk carries none) minus start. Non-streamed requests have no TTFT.
* ITL: the gaps between successive output-carrying chunks (one per chunk, so a chunk that carries
  several tokens is one gap).
* E2E latency: arrival of the last byte of the answer (for a stream, the `[DONE]` event) minus start.
* TPOT: (E2E latency - TTFT) / (completion tokens - 1), for streamed requests of >= 2 tokens.
* Per-request tokens/s: completion tokens / E2E latency.
* Token counts: the server's `usage` (requested with `stream_options.include_usage`). A server
  that sends none gets the output-carrying chunks counted instead, and the result says so
  (`usage_source: "chunks"`).

Aggregate (`aggregate()`): for each of ttft/tpot/itl/e2e/tps the mean, median, p95, p99, min and
max over the successful requests (numpy's linear-interpolation percentiles, as vLLM's benchmark);
counts of requests and tokens; overall throughput = completion tokens / duration (the wall time
from the first request sent to the last one finished), also request and total-token throughput;
goodput when SLOs are given (vLLM's definition: requests meeting every SLO, per second).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np

STATS = ("mean", "median", "p95", "p99", "min", "max")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclasses.dataclass
class RequestResult:
    index: int = 0
    model: str = ""
    success: bool = True
    error: str | None = None
    start: float = 0.0
    end: float | None = None
    first_token: float | None = None  # arrival of the first output-carrying chunk
    last_token: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    output_chunks: int = 0
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    expected_prompt_tokens: int | None = None
    usage_source: str = "none"
    streamed: bool = True

    # ---- filled in by the client -----------------------------------------------------------

    def fail(self, message: str) -> None:
        if self.success:  # the first error is the cause; later ones follow from it
            self.success = False
            self.error = message

    def add_token_chunk(self, arrived: float, text: str) -> None:
        if self.first_token is None:
            self.first_token = arrived
        else:
            self.itl.append(arrived - self.last_token)  # type: ignore[operator]
        self.last_token = arrived
        self.output_chunks += 1
        self.text += text

    def take_usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        if usage.get("completion_tokens") is not None:
            self.completion_tokens = int(usage["completion_tokens"])
            self.usage_source = "usage"
        if usage.get("prompt_tokens") is not None:
            self.prompt_tokens = int(usage["prompt_tokens"])

    def check_complete(self, streamed: bool) -> None:
        self.streamed = streamed
        if self.completion_tokens is None and streamed:
            self.completion_tokens = self.output_chunks
            self.usage_source = "chunks"
        if not self.success:
            return
        if streamed and self.first_token is None and (self.completion_tokens or 0) > 0:
            self.fail("the stream carried no output text")
        elif self.finish_reason == "abort":
            self.fail("the server aborted the request (finish_reason: abort)")

    # ---- derived ---------------------------------------------------------------------------

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        n = self.completion_tokens or 0
        if self.ttft is None or self.latency is None or n < 2:
            return None
        return (self.latency - self.ttft) / (n - 1)

    @property
    def tokens_per_second(self) -> float | None:
        if not self.latency or self.completion_tokens is None:
            return None
        return self.completion_tokens / self.latency

    def to_record(self, t0: float = 0.0) -> dict[str, Any]:
        """The JSON record of this request for the log file (times relative to t0, in seconds)."""
        return {
            "index": self.index,
            "model": self.model,
            "success": self.success,
            "error": self.error,
            "start": _round(self.start - t0),
            "ttft": _round(self.ttft),
            "tpot": _round(self.tpot),
            "e2e": _round(self.latency),
            "itl": [_round(x) for x in self.itl],
            "tokens_per_second": _round(self.tokens_per_second),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage_source": self.usage_source,
            "finish_reason": self.finish_reason,
            "output_chunks": self.output_chunks,
        }


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def summarize(values: list[float]) -> dict[str, float | None]:
    """mean/median/p95/p99/min/max of the values (None for each when there are none)."""
    if not values:
        return dict.fromkeys(STATS)
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def is_good(result: RequestResult, goodput: dict[str, float]) -> bool:
    """vLLM's goodput rule: every given SLO (milliseconds) is met; TPOT of a 1-token answer is 0."""
    checks = {
        "ttft": result.ttft if result.ttft is not None else result.latency,
        "tpot": result.tpot or 0.0,
        "e2el": result.latency,
    }
    return all(checks[name] is not None and checks[name] * 1000.0 <= limit for name, limit in goodput.items())


def aggregate(
    results: list[RequestResult], duration: float, goodput: dict[str, float] | None = None
) -> dict[str, Any]:
    """The aggregate metrics object (the `--json` output and the log file's aggregate JSON)."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    completion_tokens = sum(r.completion_tokens or 0 for r in ok)
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2e": [r.latency for r in ok if r.latency is not None],
        "tps": [r.tokens_per_second for r in ok if r.tokens_per_second is not None],
    }
    out: dict[str, Any] = {
        "total_requests": len(results),
        "successful_requests": len(ok),
        "failed_requests": len(failed),
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "duration": duration,
    }
    for name, values in series.items():
        for stat, value in summarize(values).items():  # type: ignore[arg-type]
            out[f"{name}_{stat}"] = value
    safe = duration if duration > 0 else math.nan
    out["overall_throughput"] = completion_tokens / safe if ok else 0.0
    out["total_token_throughput"] = (prompt_tokens + completion_tokens) / safe if ok else 0.0
    out["request_throughput"] = len(ok) / safe if ok else 0.0
    if goodput:
        good = sum(1 for r in ok if is_good(r, goodput))
        out["good_requests"] = good
        out["goodput"] = good / safe
        out["goodput_slos_ms"] = dict(goodput)
    out["usage_from_server"] = all(r.usage_source == "usage" for r in ok) if ok else None
    errors = Counter(r.error or "unknown error" for r in failed)
    out["errors"] = [{"error": message, "count": count} for message, count in errors.most_common()]
    models = sorted({r.model for r in results})
    if len(models) > 1:
        out["per_model"] = {m: _per_model([r for r in results if r.model == m]) for m in models}
    return out


def _per_model(results: list[RequestResult]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    return {
        "requests": len(results),
        "failed_requests": len(results) - len(ok),
        "completion_tokens": sum(r.completion_tokens or 0 for r in ok),
        "ttft_median": summarize([r.ttft for r in ok if r.ttft is not None])["median"],
        "tpot_median": summarize([r.tpot for r in ok if r.tpot is not None])["median"],
        "e2e_median": summarize([r.latency for r in ok if r.latency is not None])["median"],
    }
