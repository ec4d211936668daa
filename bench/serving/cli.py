"""`mxext bench` / `python -m bench`: the command line of the serving benchmark.

Settings come from the defaults, then `--config FILE` (YAML), then the flags given on the command
line (they win). Exit status: 0 when every request succeeded, 2 when some failed (the report
shows them), 1 when the benchmark could not run (bad settings, server unreachable, warm-up failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.serving.options import DATASETS, DEFAULT_LOG_DIR, ENDPOINTS, BenchOptions, OptionError, resolve_log_dir

DESCRIPTION = "Benchmark an OpenAI-compatible server: TTFT, TPOT, ITL, end-to-end latency and throughput."
EPILOG = (
    "Settings: defaults < --config FILE < flags. Latencies in the --json output are in seconds. "
    "Exit status 0: all requests succeeded; 2: some failed; 1: the run could not be made. "
    "See docs/BENCHMARK_TOOL.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every flag, defaulting to 'not given' (SUPPRESS) so the config file can fill the rest."""
    d = BenchOptions()
    s = argparse.SUPPRESS
    p = parser.add_argument_group("server")
    p.add_argument("--config", default=s, metavar="FILE", help="a YAML test description (server, test_params, prompts, output)")
    p.add_argument("--model", default=s, help="model name sent in each request (required, here or in --config)")
    p.add_argument("--server-url", "--base-url", dest="server_url", default=s, help=f"server root (default {d.server_url})")
    p.add_argument("--api-key", default=s, help="sent as 'Authorization: Bearer KEY' (default $OPENAI_API_KEY)")
    p.add_argument("--endpoint", choices=ENDPOINTS, default=s, help=f"chat: /v1/chat/completions, completions: /v1/completions (default {d.endpoint})")

    w = parser.add_argument_group("workload")
    w.add_argument("--dataset", choices=DATASETS, default=s, help="prompts (--prompts-file, the config's prompts or built-in questions), random or sharegpt (default prompts)")
    w.add_argument("--prompts-file", default=s, metavar="FILE", help="one prompt a line (cycled to --num-prompts)")
    w.add_argument("--dataset-path", default=s, metavar="FILE", help="ShareGPT JSON for --dataset sharegpt")
    w.add_argument("--num-prompts", type=int, default=s, help=f"requests to send (default {d.num_prompts})")
    w.add_argument("--max-tokens", type=int, default=s, help=f"max_tokens of each request (default {d.max_tokens}; random: unless --output-len)")
    w.add_argument("--temperature", type=float, default=s, help=f"sampling temperature (default {d.temperature})")
    w.add_argument("--input-len", type=int, default=s, help=f"random: prompt length in tokens (default {d.input_len})")
    w.add_argument("--output-len", type=int, default=s, help="random/sharegpt: tokens to generate (random default: --max-tokens; sharegpt: the dataset's)")
    w.add_argument("--range-ratio", type=float, default=s, help="random: lengths uniform in [len*(1-r), len*(1+r)] (default 0)")
    w.add_argument("--ignore-eos", action="store_true", default=s, help="send ignore_eos so every request generates all its tokens")
    w.add_argument("--tokenizer", default=s, metavar="FOLDER", help="local tokenizer for random/sharegpt (default: the server's /tokenize)")
    w.add_argument("--lora", default=s, metavar="NAME[:W],...", help="send requests to a LoRA adapter, or a weighted mix: sql:3,chat:1")
    w.add_argument("--seed", type=int, default=s, help=f"seed of the dataset, arrivals and LoRA mix (default {d.seed})")

    load = parser.add_argument_group("load")
    load.add_argument("--concurrent-requests", "--max-concurrency", dest="concurrent_requests", type=int, default=s,
                      help=f"requests in flight at most (default {d.concurrent_requests})")  # fmt: skip
    load.add_argument("--request-rate", default=s, help="arrivals per second (default inf: as fast as concurrency allows)")
    load.add_argument("--burstiness", default=s, help="gamma shape of the arrival gaps: 1 Poisson (default), <1 burstier, >1 steadier")
    stream = load.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=s, help="stream answers (the default)")
    stream.add_argument("--no-stream", dest="stream", action="store_false", default=s, help="whole answers (no TTFT/TPOT/ITL)")
    load.add_argument("--sweep", default=s, metavar="1,2,4,...", help="run once per concurrency level and chart them")
    load.add_argument("--goodput", nargs="+", default=s, metavar="KEY:MS", help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    load.add_argument("--num-warmups", type=int, default=s, help="untimed requests before the run (default 1)")
    load.add_argument("--ready-timeout", type=float, default=s, metavar="S", help="wait up to S seconds for the server's /health to answer 200 (default 0: no wait)")
    load.add_argument("--request-timeout", type=float, default=s, help="seconds before a request counts as failed (default 600)")

    out = parser.add_argument_group("output")
    out.add_argument("--log-dir", default=s, help=f"where mim_profile_*.log and .png go (default {DEFAULT_LOG_DIR}, else a user folder)")
    out.add_argument("--no-save", dest="save", action="store_false", default=s, help="write no log file or chart")
    out.add_argument("--save-individual", action="store_true", default=s, help="put one JSON per request in the log file")
    out.add_argument("--no-plot", dest="plot", action="store_false", default=s, help="write no PNG chart")
    out.add_argument("--json", action="store_true", default=s, help="print the aggregate metrics as JSON on stdout (report to stderr)")
    out.add_argument("--lang", choices=("en", "zh"), default=s, help="report headings: en (default) or zh")
    out.add_argument("--no-progress", dest="progress", action="store_false", default=s, help="no progress bar")
    return parser


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    return add_arguments(parser)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """defaults < --config < flags, checked."""
    from bench.serving.config_runner import coerce, load_config, options_from

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    settings: dict[str, Any] = {}
    config = given.pop("config", None)
    if config:
        settings.update(load_config(config))
    for key, value in given.items():
        settings[key] = coerce(key, value)
    if "api_key" not in settings and os.environ.get("OPENAI_API_KEY"):
        settings["api_key"] = os.environ["OPENAI_API_KEY"]
    return options_from(settings)


def execute(opts: BenchOptions, print_report: bool = True) -> dict[str, Any]:
    """Run the benchmark and write its outputs; returns {aggregate, log_file, plot_file, exit_code, reports}."""
    from bench.serving.report import aggregate_object, format_report, format_sweep, log_path, write_log
    from bench.serving.runner import run_benchmark

    console = sys.stderr if opts.json else sys.stdout
    folder = None
    if opts.save:
        folder, warning = resolve_log_dir(opts.log_dir)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    started = time.time()
    runs, _samples = asyncio.run(run_benchmark(opts))

    texts = [format_report(opts, run.metrics, run.concurrency, opts.lang) for run in runs]
    if len(runs) > 1:
        texts.append(format_sweep([run.metrics for run in runs], opts.lang))
    english = texts if opts.lang == "en" else [format_report(opts, r.metrics, r.concurrency, "en") for r in runs]
    if len(runs) > 1 and opts.lang != "en":
        english.append(format_sweep([run.metrics for run in runs], "en"))
    if print_report:
        print("\n\n".join(texts), file=console, flush=True)

    result: dict[str, Any] = {"aggregate": aggregate_object(runs), "log_file": None, "plot_file": None, "reports": texts}
    if folder is not None:
        path = log_path(folder, started)
        write_log(path, opts, runs, "\n\n".join(english), started)
        result["log_file"] = str(path)
        if opts.plot:
            result["plot_file"] = _plot(runs, path.with_suffix(".png"), opts)
        if print_report:
            print(f"log: {path}" + (f"\nchart: {result['plot_file']}" if result["plot_file"] else ""), file=console)
    if opts.json:
        print(json.dumps(result["aggregate"], indent=2, ensure_ascii=False, default=_json_default), flush=True)
    failed = sum(run.metrics["failed_requests"] for run in runs)
    result["exit_code"] = 2 if failed else 0
    return result


def _plot(runs: list[Any], path: Path, opts: BenchOptions) -> str | None:
    try:
        from bench.serving.plots import plot_run, plot_sweep
    except ImportError:
        print("warning: matplotlib is not installed; no chart (pip install matplotlib)", file=sys.stderr)
        return None
    title = f"{opts.model} @ {opts.server_url} ({opts.dataset_name}, {opts.endpoint})"
    try:
        if len(runs) > 1:
            plot_sweep(runs, path, title)
        else:
            plot_run(runs[0], path, title)
    except ImportError:
        print("warning: matplotlib is not installed; no chart (pip install matplotlib)", file=sys.stderr)
        return None
    return str(path)


def _json_default(value: Any) -> Any:
    return str(value)


def run_args(args: argparse.Namespace) -> int:
    """Entry point once the flags are parsed (used by `mxext bench` too)."""
    from bench.serving.client import HTTPError
    from bench.serving.runner import BenchError

    try:
        opts = options_from_args(args)
        return int(execute(opts)["exit_code"])
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (BenchError, HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_args(args)


__all__ = ["add_arguments", "build_parser", "execute", "main", "options_from_args", "run_args"]
