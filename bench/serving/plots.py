"""PNG charts (matplotlib, headless): latency distributions of a run; for a sweep, throughput and
latency against concurrency. Labels stay in English so no CJK font is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ms(values: list[float]) -> list[float]:
    return [v * 1000.0 for v in values]


def _series(run: Any) -> dict[str, list[float]]:
    ok = [r for r in run.results if r.success]
    return {
        "TTFT": _ms([r.ttft for r in ok if r.ttft is not None]),
        "TPOT": _ms([r.tpot for r in ok if r.tpot is not None]),
        "ITL": _ms([gap for r in ok for gap in r.itl]),
        "E2E latency": _ms([r.latency for r in ok if r.latency is not None]),
    }


def plot_run(run: Any, path: Path, title: str = "") -> Path:
    """Histograms of TTFT, TPOT, ITL and E2E latency (ms) of one run, median and P99 marked."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (name, values) in zip(axes.flat, _series(run).items()):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 3)), color="#4C72B0", alpha=0.85)
            for q, style in ((50, "-"), (99, "--")):
                x = float(np.percentile(values, q))
                ax.axvline(x, color="#C44E52", linestyle=style, linewidth=1.2, label=f"P{q} {x:.1f} ms")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    m = run.metrics
    fig.suptitle(
        (title + "\n" if title else "")
        + f"concurrency {run.concurrency}: {m['successful_requests']} ok, {m['failed_requests']} failed, "
        + f"{m['overall_throughput']:.1f} output tok/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(runs: list[Any], path: Path, title: str = "") -> Path:
    """Throughput and latency (median and P99) against concurrency, and E2E latency box plots."""
    plt = _pyplot()
    levels = [run.concurrency for run in runs]
    metrics = [run.metrics for run in runs]

    def col(key: str, scale: float = 1.0) -> list[float]:
        return [float("nan") if m.get(key) is None else m[key] * scale for m in metrics]

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    ax.plot(levels, col("overall_throughput"), "o-", label="output tok/s")
    ax.plot(levels, col("total_token_throughput"), "s--", label="total tok/s")
    ax.set_title("Throughput vs concurrency")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(levels, col("request_throughput"), "^:", color="#55A868", label="req/s")
    ax2.set_ylabel("requests/s")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8, loc="upper left")
    for ax, key, name in ((axes[0][1], "ttft", "TTFT"), (axes[1][0], "tpot", "TPOT")):
        ax.plot(levels, col(f"{key}_median", 1000), "o-", label="median")
        ax.plot(levels, col(f"{key}_p99", 1000), "s--", label="P99")
        ax.set_title(f"{name} vs concurrency")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    data = [_series(run)["E2E latency"] or [float("nan")] for run in runs]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(levels) + 1), [str(c) for c in levels])
    ax.set_title("E2E latency distribution")
    ax.set_ylabel("ms")
    for ax in axes.flat:
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
    for ax in (axes[0][0], axes[0][1], axes[1][0]):
        if len(levels) > 1 and max(levels) / max(1, min(levels)) >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
