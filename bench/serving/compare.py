"""Our tester and vLLM's serving benchmark on the same server and workload, side by side.

    python -m bench.serving.compare --server-url http://127.0.0.1:8000 --model smollm2-135m-instruct \
        --tokenizer ~/.cache/mxext-peers/smollm2-hf --num-prompts 64 --input-len 128 --output-len 64 \
        --concurrency 8 --repeats 2

Workload for both: the random dataset from the same local tokenizer (our generator gives vLLM's
prompts exactly for a seed, and our arrival times with --request-rate are vLLM's too), /v1/completions streamed, ignore_eos, temperature 0, all requests
arriving at once behind a concurrency limit, --warmups untimed requests with the first prompt (default 1:
vLLM makes none by default, ours one). Around each run it reads the server's own TTFT and E2E
histograms from /metrics (vLLM's metric names, which ours uses too), so each tool's mean can be
set against the server's mean over the same requests (warm-ups included: pass --warmups 0 for an
exact match). Every run gets a seed of its own
(--seed, --seed + 1, ...): the same prompts again would hit the server's prefix cache and make
the later run's TTFT look better. The runs alternate (ours, vLLM, ours, vLLM, ...) so a change in
the machine's load hits both; each is a separate process. Prints one row per run and the means
with the ratio ours / vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

VLLM_PYTHON = "~/.cache/mxext-peers/vllm-venv/bin/python"
PEER_SCRIPT = Path(__file__).with_name("vllm_bench_peer.py")
REPO = Path(__file__).resolve().parents[2]
FIELDS = [  # (label, our key and scale, vLLM key)
    ("output tok/s", ("overall_throughput", 1.0), "output_throughput"),
    ("total tok/s", ("total_token_throughput", 1.0), "total_token_throughput"),
    ("req/s", ("request_throughput", 1.0), "request_throughput"),
    ("median TTFT ms", ("ttft_median", 1000.0), "median_ttft_ms"),
    ("mean TTFT ms", ("ttft_mean", 1000.0), "mean_ttft_ms"),
    ("median TPOT ms", ("tpot_median", 1000.0), "median_tpot_ms"),
    ("median ITL ms", ("itl_median", 1000.0), "median_itl_ms"),
    ("median E2E ms", ("e2e_median", 1000.0), "median_e2el_ms"),
    ("mean E2E ms", ("e2e_mean", 1000.0), "mean_e2el_ms"),
]


SERVER_HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "e2e": "vllm:e2e_request_latency_seconds"}


def scrape(url: str) -> dict[str, float] | None:
    """Sums and counts of the server's own TTFT and E2E histograms (vLLM's names; ours uses them too)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for key, name in SERVER_HISTOGRAMS.items():
        for part in ("sum", "count"):
            values = re.findall(rf"^{re.escape(name)}_{part}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
            if not values and f"# TYPE {name} histogram" not in text:
                return None  # no such histogram (a labelled one has no samples before its first request)
            out[f"{key}_{part}"] = sum(float(v) for v in values)
    return out


def server_means(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """The server's own mean TTFT and E2E (ms) over the requests of one run (warm-ups included)."""
    if not before or not after:
        return {}
    out = {}
    for key in SERVER_HISTOGRAMS:
        count = after[f"{key}_count"] - before[f"{key}_count"]
        if count > 0:
            out[f"server mean {key.upper()} ms"] = (after[f"{key}_sum"] - before[f"{key}_sum"]) / count * 1000.0
    return out


def run_ours(a: argparse.Namespace, seed: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench", "--json", "--no-save", "--no-progress", "--server-url", a.server_url,
           "--model", a.model, "--endpoint", "completions", "--dataset", "random", "--tokenizer", a.tokenizer,
           "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--num-prompts", str(a.num_prompts),
           "--concurrent-requests", str(a.concurrency), "--ignore-eos", "--temperature", "0", "--seed", str(seed),
           "--request-rate", a.request_rate, "--burstiness", a.burstiness, "--range-ratio", str(a.range_ratio),
           "--num-warmups", str(a.warmups)]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"our tester failed ({out.returncode}):\n{out.stderr[-3000:]}")
    m = json.loads(out.stdout)
    if m["failed_requests"]:
        raise SystemExit(f"our tester had {m['failed_requests']} failed requests: {m['errors']}")
    return {label: m[key] * scale for label, (key, scale), _ in FIELDS}


def run_vllm(a: argparse.Namespace, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.expanduser(a.vllm_python), str(PEER_SCRIPT), "--base-url", a.server_url, "--model", a.model,
               "--tokenizer", a.tokenizer, "--endpoint", "/v1/completions", "--dataset-name", "random",
               "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
               "--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.concurrency),
               "--request-rate", a.request_rate, "--burstiness", a.burstiness, "--random-range-ratio", str(a.range_ratio),
               "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm", "--num-warmups", str(a.warmups),
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
               "--save-result", "--result-dir", tmp, "--result-filename", "vllm.json"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        path = Path(tmp) / "vllm.json"
        if out.returncode != 0 or not path.exists():
            raise SystemExit(f"vLLM's benchmark failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        m = json.loads(path.read_text())
    if m.get("completed") != a.num_prompts:
        raise SystemExit(f"vLLM's benchmark completed {m.get('completed')} of {a.num_prompts}")
    return {label: float(m[key]) for label, _, key in FIELDS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--server-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder (both tools use it)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--request-rate", default="inf", help="arrivals per second (default inf: all at once)")
    p.add_argument("--burstiness", default="1", help="gamma shape of the arrival gaps (1: Poisson)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="random lengths uniform in len*(1-r)..len*(1+r)")
    p.add_argument("--warmups", type=int, default=1, help="untimed requests before each run (both tools)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="the first run's seed; each later run adds 1")
    p.add_argument("--vllm-python", default=VLLM_PYTHON)
    p.add_argument("--out", help="write every run's figures here (JSON)")
    a = p.parse_args(argv)
    a.tokenizer = os.path.expanduser(a.tokenizer)

    rows: list[tuple[str, dict[str, float]]] = []
    for i in range(a.repeats):
        for name, fn in (("ours", run_ours), ("vllm", run_vllm)):
            before = scrape(a.server_url)
            figures = fn(a, a.seed + len(rows))
            figures.update(server_means(before, scrape(a.server_url)))
            rows.append((name, figures))
            print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), file=sys.stderr, flush=True)
    labels = [label for label, _, _ in FIELDS] + [k for k in ("server mean TTFT ms", "server mean E2E ms") if all(k in f for _, f in rows)]
    mean = {name: {k: statistics.fmean(f[k] for n, f in rows if n == name) for k in labels} for name in ("ours", "vllm")}
    print("| metric | " + " | ".join(f"{n} run {i // 2 + 1}" for i, (n, _) in enumerate(rows)) + " | ours mean | vLLM mean | ours / vLLM |")
    print("| --- |" + " ---: |" * (len(rows) + 3))
    for k in labels:
        cells = " | ".join(f"{f[k]:.2f}" for _, f in rows)
        print(f"| {k} | {cells} | {mean['ours'][k]:.2f} | {mean['vllm'][k]:.2f} | {mean['ours'][k] / mean['vllm'][k]:.3f} |")
    if "server mean TTFT ms" in labels:
        for key in ("TTFT", "E2E"):
            print(f"\nclient mean {key} - server mean {key} (ms): "
                  + ", ".join(f"{n} {f[f'mean {key} ms'] - f[f'server mean {key} ms']:+.1f}" for n, f in rows))  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": rows, "mean": mean}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
