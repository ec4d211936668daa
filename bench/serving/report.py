"""The console report (English or Chinese headings), the sweep table and the log file.

The log file `mim_profile_YYYYMMDD_HHMMSS.log` has sections, each headed by a line `== NAME ==`:
`Test configuration` (JSON), `Report` (the console report), `Aggregate metrics` (JSON: the
aggregate object, or for a sweep `{"sweep": [...]}`), and with --save-individual
`Individual requests` (one JSON object a line). `parse_log()` reads it back.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from bench.serving.options import BenchOptions

WIDTH = 60

TEXT = {
    "en": {
        "title": "Serving Benchmark Result",
        "summary": "Summary",
        "ttft": "Time to First Token (TTFT)",
        "tpot": "Time per Output Token (TPOT, excl. 1st token)",
        "itl": "Inter-token Latency (ITL)",
        "e2e": "End-to-end Latency",
        "throughput": "Throughput",
        "errors": "Failed requests",
        "sweep": "Concurrency Sweep",
        "server": "Server",
        "model": "Model",
        "endpoint": "Endpoint",
        "dataset": "Dataset",
        "concurrency": "Concurrent requests",
        "rate": "Request rate (req/s)",
        "total": "Total requests",
        "ok": "Successful requests",
        "failed": "Failed requests",
        "duration": "Benchmark duration (s)",
        "prompt_tokens": "Prompt tokens",
        "completion_tokens": "Completion tokens",
        "total_tokens": "Total tokens",
        "req_tput": "Request throughput (req/s)",
        "out_tput": "Output token throughput (tok/s)",
        "tot_tput": "Total token throughput (tok/s)",
        "per_req": "Per-request output tok/s",
        "goodput": "Request goodput (req/s)",
        "good": "Requests meeting the SLOs",
        "mean": "Mean",
        "median": "Median",
        "p95": "P95",
        "p99": "P99",
        "min": "Min",
        "max": "Max",
        "ms": "ms",
        "na": "n/a",
        "no_stream": "n/a (not streamed)",
        "interrupted": "Interrupted: the figures cover what finished",
        "usage_chunks": "Note: the server sent no usage; output tokens counted from chunks",
        "per_model": "Per model / adapter",
        "streaming": "streaming",
        "not_streaming": "not streaming",
    },
    "zh": {
        "title": "服务性能测试结果",
        "summary": "测试摘要",
        "ttft": "首字延迟 (TTFT)",
        "tpot": "每输出词元时间 (TPOT，不含首个词元)",
        "itl": "词间延迟 (ITL)",
        "e2e": "端到端延迟",
        "throughput": "吞吐量",
        "errors": "失败请求",
        "sweep": "并发扫描",
        "server": "服务地址",
        "model": "模型",
        "endpoint": "接口",
        "dataset": "数据集",
        "concurrency": "并发请求数",
        "rate": "请求速率 (请求/秒)",
        "total": "请求总数",
        "ok": "成功请求数",
        "failed": "失败请求数",
        "duration": "测试时长 (秒)",
        "prompt_tokens": "输入词元数",
        "completion_tokens": "输出词元数",
        "total_tokens": "总词元数",
        "req_tput": "请求吞吐量 (请求/秒)",
        "out_tput": "输出词元吞吐量 (词元/秒)",
        "tot_tput": "总词元吞吐量 (词元/秒)",
        "per_req": "单请求输出速度 (词元/秒)",
        "goodput": "有效吞吐量 (请求/秒)",
        "good": "满足 SLO 的请求数",
        "mean": "平均值",
        "median": "中位数",
        "p95": "P95",
        "p99": "P99",
        "min": "最小值",
        "max": "最大值",
        "ms": "毫秒",
        "na": "无",
        "no_stream": "无 (非流式)",
        "interrupted": "测试被中断：以下数据仅含已完成的请求",
        "usage_chunks": "注意：服务未返回 usage，输出词元数按数据块计数",
        "per_model": "按模型 / 适配器",
        "streaming": "流式",
        "not_streaming": "非流式",
    },
}


def _width(text: str) -> int:
    """Display width: CJK characters take two columns."""
    return sum(2 if ord(ch) > 0x2E7F else 1 for ch in text)


def _row(label: str, value: Any) -> str:
    pad = max(1, 40 - _width(label))
    return f"{label}{' ' * pad}{value}"


def _heading(text: str, fill: str = "-") -> str:
    inner = f" {text} "
    left = max(2, (WIDTH - _width(inner)) // 2)
    right = max(2, WIDTH - _width(inner) - left)
    return fill * left + inner + fill * right


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(opts: BenchOptions, metrics: dict[str, Any], concurrency: int, lang: str = "en") -> str:
    """The console report of one run."""
    t = TEXT[lang]
    rate = opts.request_rate
    lines = [_heading(t["title"], "="), _heading(t["summary"])]
    endpoint = "/v1/chat/completions" if opts.endpoint == "chat" else "/v1/completions"
    lines += [
        _row(t["server"] + ":", opts.server_url),
        _row(t["model"] + ":", opts.model if not opts.lora else ", ".join(f"{k}:{v:g}" for k, v in opts.lora.items())),
        _row(t["endpoint"] + ":", f"{endpoint} ({t['streaming'] if opts.stream else t['not_streaming']})"),
        _row(t["dataset"] + ":", opts.dataset_name),
        _row(t["concurrency"] + ":", concurrency),
        _row(t["rate"] + ":", "inf" if math.isinf(rate) else f"{rate:g}"),
        _row(t["total"] + ":", metrics["total_requests"]),
        _row(t["ok"] + ":", metrics["successful_requests"]),
        _row(t["failed"] + ":", metrics["failed_requests"]),
        _row(t["duration"] + ":", _fmt(metrics["duration"])),
        _row(t["prompt_tokens"] + ":", metrics["prompt_tokens"]),
        _row(t["completion_tokens"] + ":", metrics["completion_tokens"]),
        _row(t["total_tokens"] + ":", metrics["total_tokens"]),
    ]
    if metrics.get("interrupted"):
        lines.append(t["interrupted"])
    if metrics.get("usage_from_server") is False:
        lines.append(t["usage_chunks"])
    for key in ("ttft", "tpot", "itl", "e2e"):
        lines.append(_heading(t[key]))
        if key != "e2e" and not opts.stream:
            lines.append(_row(t["na"] + ":", t["no_stream"]))
            continue
        for stat in ("mean", "median", "p95", "p99", "min", "max"):
            value = metrics.get(f"{key}_{stat}")
            lines.append(_row(f"{t[stat]} ({t['ms']}):", _fmt(None if value is None else value * 1000.0)))
    lines.append(_heading(t["throughput"]))
    lines += [
        _row(t["req_tput"] + ":", _fmt(metrics["request_throughput"], 3)),
        _row(t["out_tput"] + ":", _fmt(metrics["overall_throughput"])),
        _row(t["tot_tput"] + ":", _fmt(metrics["total_token_throughput"])),
    ]
    if "goodput" in metrics:
        lines += [_row(t["goodput"] + ":", _fmt(metrics["goodput"], 3)), _row(t["good"] + ":", metrics["good_requests"])]
    for stat in ("mean", "median", "p95", "p99", "min", "max"):
        lines.append(_row(f"{t['per_req']} {t[stat]}:", _fmt(metrics.get(f"tps_{stat}"))))
    if metrics.get("per_model"):
        lines.append(_heading(t["per_model"]))
        for name, item in metrics["per_model"].items():
            lines.append(
                f"{name}: {item['requests']} req, {item['failed_requests']} failed, "
                f"TTFT p50 {_fmt(_ms(item['ttft_median']))} ms, TPOT p50 {_fmt(_ms(item['tpot_median']))} ms, "
                f"E2E p50 {_fmt(_ms(item['e2e_median']))} ms"
            )
    if metrics["errors"]:
        lines.append(_heading(t["errors"]))
        for item in metrics["errors"][:10]:
            lines.append(f"{item['count']:>5} × {item['error'][:200]}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def format_sweep(runs_metrics: list[dict[str, Any]], lang: str = "en") -> str:
    """One line per concurrency level: throughput and median/P99 latencies."""
    t = TEXT[lang]
    header = ["conc", "ok", "fail", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50", "E2E p50", "E2E p99"]
    rows = []
    for m in runs_metrics:
        rows.append([
            str(m["concurrent_requests"]), str(m["successful_requests"]), str(m["failed_requests"]),
            _fmt(m["request_throughput"], 3), _fmt(m["overall_throughput"]),
            *(_fmt(_ms(m.get(k))) for k in ("ttft_median", "ttft_p99", "tpot_median", "itl_median", "e2e_median", "e2e_p99")),
        ])  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = [_heading(f"{t['sweep']} ({t['ms']})", "="), "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    out.append("=" * WIDTH)
    return "\n".join(out)


# ---- the log file ----------------------------------------------------------------------------


def log_path(folder: Path, when: float | None = None) -> Path:
    """mim_profile_YYYYMMDD_HHMMSS.log in folder (a suffix _1, _2 ... if that name is taken)."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(when or time.time()))
    path = folder / f"mim_profile_{stamp}.log"
    n = 1
    while path.exists():
        path = folder / f"mim_profile_{stamp}_{n}.log"
        n += 1
    return path


def aggregate_object(runs: list[Any]) -> dict[str, Any]:
    """What --json prints and the log's aggregate section holds: one run's metrics, or {"sweep": [...]}."""
    if len(runs) == 1:
        return runs[0].metrics
    return {"sweep": [run.metrics for run in runs]}


def write_log(path: Path, opts: BenchOptions, runs: list[Any], report_text: str, started: float) -> None:
    """Write the log file (see the module docstring for its layout)."""
    config = opts.describe()
    config["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
    parts = [
        f"# mim_profile: mxext bench, {config['started_at']}",
        "== Test configuration ==",
        json.dumps(config, indent=2, ensure_ascii=False, default=str),
        "== Report ==",
        report_text,
        "== Aggregate metrics ==",
        json.dumps(aggregate_object(runs), indent=2, ensure_ascii=False, default=_json_default),
    ]
    if opts.save_individual:
        parts.append("== Individual requests ==")
        for run in runs:
            for result in run.results:
                record = result.to_record(run.t0)
                record["concurrent_requests"] = run.concurrency
                parts.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def parse_log(path: Path) -> dict[str, Any]:
    """Read a log file back: {"config": {...}, "report": str, "aggregate": {...}, "requests": [...]}."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("== ") and line.endswith(" ==") and line[3:-3] in (
            "Test configuration", "Report", "Aggregate metrics", "Individual requests"
        ):  # fmt: skip
            current = line[3:-3]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    out: dict[str, Any] = {
        "config": json.loads("\n".join(sections.get("Test configuration", ["{}"]))),
        "report": "\n".join(sections.get("Report", [])),
        "aggregate": json.loads("\n".join(sections.get("Aggregate metrics", ["{}"]))),
        "requests": [json.loads(line) for line in sections.get("Individual requests", []) if line.strip()],
    }
    return out
