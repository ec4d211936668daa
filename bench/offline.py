"""Offline engine benchmark: a fixed random-token workload through `app.engine.LLM`, optionally vs vLLM CPU.

    python -m bench.offline                 # our engine
    python -m bench.offline --peer vllm     # the same workload through vLLM (its own venv, subprocess)
    python -m bench.offline --compare       # both, ours first, then a side-by-side table (ours/vllm)

Workload (`make_workload`, one function for both engines so they get identical token ids):
`--num-prompts` prompts of token ids drawn uniformly from `--vocab-range` (numpy, `--seed`), input
lengths uniform in `--input-len-range`, output lengths uniform in `--output-len-range` (both
inclusive), greedy, ignore_eos, one SamplingParams(max_tokens=its output length) per prompt, all in
one generate() call, timed `--repeats` times per engine (prefix cache reset between; figures from the
fastest run, its median beside it). Figures: output tokens, elapsed s, output tok/s, total (in+out) tok/s.

Batch-1 decode: a `--decode-prompt-len` prompt alone, timed for max_tokens=1 (prefill + first token)
and for max_tokens=`--decode-tokens`; decode tok/s = (N - 1) / (T(N) - T(1)). The two runs use
different prompts of the same length so prefix caching cannot shorten the second prefill.

Both engines get the same warm-up (a few short generations) before anything is timed.
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
import time
from pathlib import Path

import numpy as np

VLLM_PYTHON = "~/.cache/mxext-peers/vllm-venv/bin/python"
VLLM_MODEL = "~/.cache/mxext-peers/smollm2-hf"
PEER_SCRIPT = Path(__file__).with_name("vllm_offline_peer.py")


# ---- the workload (shared by both engines) ---------------------------------------------------


def make_workload(
    num_prompts: int = 64,
    input_len_range: tuple[int, int] = (64, 256),
    output_len_range: tuple[int, int] = (32, 128),
    seed: int = 0,
    vocab_range: tuple[int, int] = (1000, 40000),
    decode_prompt_len: int = 32,
    decode_tokens: int = 128,
    decode_repeats: int = 1,
    throughput_repeats: int = 1,
) -> dict:
    """Every token id and length either engine sees. JSON-serialisable (plain ints and lists)."""
    rng = np.random.default_rng(seed)
    lo, hi = vocab_range

    def ids(n: int) -> list[int]:
        return rng.integers(lo, hi, size=n).tolist()  # [lo, hi)

    in_lens = rng.integers(input_len_range[0], input_len_range[1] + 1, size=num_prompts).tolist()
    out_lens = rng.integers(output_len_range[0], output_len_range[1] + 1, size=num_prompts).tolist()
    prompts = [ids(n) for n in in_lens]
    # Warm-up: a lone short request, then a small batch of mixed lengths (prefill + batched decode).
    warmup = [
        {"prompts": [ids(16)], "output_lens": [8]},
        {"prompts": [ids(n) for n in (24, 48, 96, 160)], "output_lens": [8, 8, 8, 8]},
        {"prompts": [ids(32)], "output_lens": [16]},
    ]
    decode = {
        "prompt_len": decode_prompt_len,
        "tokens": decode_tokens,
        "repeats": decode_repeats,
        "prompts_first": [ids(decode_prompt_len) for _ in range(decode_repeats)],
        "prompts_full": [ids(decode_prompt_len) for _ in range(decode_repeats)],
    }
    return {
        "seed": seed,
        "vocab_range": list(vocab_range),
        "input_len_range": list(input_len_range),
        "output_len_range": list(output_len_range),
        "prompts": prompts,
        "output_lens": out_lens,
        "warmup": warmup,
        "decode": decode,
        "throughput_repeats": throughput_repeats,
    }


def figures(wl: dict, raw: dict) -> dict:
    """Derived figures from one engine's raw timings; the same arithmetic for both engines."""
    n_in = sum(len(p) for p in wl["prompts"])
    n_out = sum(wl["output_lens"])
    elapsed = raw["elapsed_s"]
    t1 = statistics.median(raw["decode_t1_s"])
    tn = statistics.median(raw["decode_tn_s"])
    n_dec = wl["decode"]["tokens"]
    out = {
        "engine": raw["engine"],
        "num_prompts": len(wl["prompts"]),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "produced_output_tokens": raw["produced_output_tokens"],
        "elapsed_s": elapsed,
        "output_tok_s": n_out / elapsed,
        "output_tok_s_median": n_out / statistics.median(raw.get("elapsed_runs_s") or [elapsed]),
        "total_tok_s": (n_in + n_out) / elapsed,
        "decode_prompt_len": wl["decode"]["prompt_len"],
        "decode_tokens": n_dec,
        "decode_first_token_s": t1,
        "decode_total_s": tn,
        "decode_tok_s": (n_dec - 1) / (tn - t1) if tn > t1 else float("nan"),
    }
    for k in ("version", "torch", "model", "settings", "load_s", "warmup_s", "side_wall_s", "loadavg"):
        if k in raw:
            out[k] = raw[k]
    if raw["produced_output_tokens"] != n_out or raw.get("short_outputs"):
        out["warning"] = (
            f"produced {raw['produced_output_tokens']} output tokens, workload asked for {n_out} "
            f"({raw.get('short_outputs', '?')} requests off): ignore_eos/max_tokens not honoured"
        )
    return out


# ---- our engine --------------------------------------------------------------------------------


def _resolve_ours(model: str) -> str:
    """A folder as is; a store name via the store's models/ folder when present, else LLM resolves it."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    home = Path(os.environ.get("MXEXT_HOME") or "~/.cache/mxext").expanduser()
    if (home / "models" / model / "config.json").is_file():
        return str(home / "models" / model)
    return model


def run_ours(wl: dict, args: argparse.Namespace) -> dict:
    t_side = time.perf_counter()
    t_start = time.perf_counter()
    import torch

    from app.engine import LLM, SamplingParams

    kwargs = {"quantization": args.quantization}
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_gib:
        kwargs["kv_cache_bytes"] = int(args.kv_cache_gib * 2**30)
    llm = LLM(model=_resolve_ours(args.model), dtype=args.dtype, **kwargs)
    load_s = time.perf_counter() - t_start

    def timed(prompts, out_lens):
        sps = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True) for m in out_lens]
        t0 = time.perf_counter()
        outs = llm.generate([list(p) for p in prompts], sps)
        return time.perf_counter() - t0, outs

    t0 = time.perf_counter()
    for batch in wl["warmup"]:
        timed(batch["prompts"], batch["output_lens"])
    warmup_s = time.perf_counter() - t0

    runs = []
    for _ in range(int(wl.get("throughput_repeats", 1))):
        llm.engine.block_manager.reset_prefix_cache()  # each run prefills from scratch
        elapsed, outs = timed(wl["prompts"], wl["output_lens"])
        runs.append(elapsed)
    produced = [len(o.token_ids) for o in outs]

    dec = wl["decode"]
    t1s, tns = [], []
    for rep in range(dec["repeats"]):
        t1, _ = timed([dec["prompts_first"][rep]], [1])
        tn, o = timed([dec["prompts_full"][rep]], [dec["tokens"]])
        if len(o[0].token_ids) != dec["tokens"]:
            raise RuntimeError(f"decode run produced {len(o[0].token_ids)} tokens, wanted {dec['tokens']}")
        t1s.append(t1)
        tns.append(tn)

    cfg = llm.config
    runner = getattr(llm.engine, "runner", None)
    settings = {
        "dtype": cfg.dtype,
        "resolved_dtype": str(getattr(runner, "dtype", "?")).removeprefix("torch."),
        "quantization": cfg.quantization,
        "int8_max_tokens": getattr(runner, "int8_max_tokens", None),
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "kv_cache_bytes": cfg.kv_cache_bytes,
        "num_kv_blocks": getattr(runner, "num_blocks", None),
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "torch_threads": torch.get_num_threads(),
    }
    return {
        "engine": "ours",
        "version": _our_version(),
        "torch": torch.__version__,
        "model": cfg.model,
        "settings": settings,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "elapsed_s": min(runs),
        "elapsed_runs_s": runs,
        "produced_output_tokens": sum(produced),
        "short_outputs": sum(1 for p, want in zip(produced, wl["output_lens"]) if p != want),
        "decode_t1_s": t1s,
        "decode_tn_s": tns,
        "side_wall_s": time.perf_counter() - t_side,
    }


def _our_version() -> str:
    """HEAD, plus '+dirty' when app/engine has uncommitted changes (the figures are then of those)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, timeout=10).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "app/engine"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {rev}{'+dirty' if dirty else ''}" if rev else "unknown"


# ---- vLLM (subprocess under its own venv) --------------------------------------------------


def run_vllm(wl: dict, args: argparse.Namespace) -> dict:
    t_side = time.perf_counter()
    python = str(Path(args.vllm_python).expanduser())
    if not Path(python).is_file():
        raise SystemExit(f"vLLM python not found at {python}: pass --vllm-python")
    payload = dict(wl)
    payload["settings"] = {
        "vllm_model": args.vllm_model,
        "vllm_dtype": args.vllm_dtype,
        "max_model_len": args.vllm_max_model_len,
        "max_num_seqs": args.max_num_seqs or args._ours_default_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens or args._ours_default_batched,
    }
    env = dict(os.environ)
    if args.kv_cache_gib:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(args.kv_cache_gib)))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    if args.vllm_omp_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_omp_bind
    env.pop("PYTHONPATH", None)  # the peer must not see our app package
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
        path = Path(tmp) / "workload.json"
        path.write_text(json.dumps(payload))
        # stdout carries vLLM's log lines too; the figures are its last line. Logs -> our stderr.
        proc = subprocess.Popen([python, str(PEER_SCRIPT.resolve()), str(path)], stdout=subprocess.PIPE,
                                stderr=None if args.verbose else subprocess.PIPE, text=True, env=env, cwd=tmp)
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if args.verbose:
                sys.stderr.write(line)
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        rc = proc.wait()
    raw = _last_json(lines)
    if rc != 0 or raw is None:
        sys.stderr.write("".join(lines[-40:]) + stderr[-8000:])
        raise SystemExit(f"vLLM peer failed (exit {rc}); its output is above")
    # The worker's OpenMP binding (vLLM's log, e.g. "local_rank=0, core ids=[1]"): how many cores it computes on.
    cores = [m.group(1) for m in (re.search(r"core ids=\[([^\]]*)\]", ln) for ln in lines + stderr.splitlines()) if m]
    if cores:
        raw.setdefault("settings", {})["worker_omp_cores"] = cores[-1]
    raw["side_wall_s"] = time.perf_counter() - t_side
    return raw


def _last_json(lines: list[str]) -> dict | None:
    """The peer's figures: its last stdout line that is a JSON object from the peer."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("engine") == "vllm":
                return obj
    return None


# ---- output ------------------------------------------------------------------------------------

ROWS = [
    ("total_output_tokens", "output tokens", "{:.0f}"),
    ("total_input_tokens", "input tokens", "{:.0f}"),
    ("elapsed_s", "elapsed s", "{:.2f}"),
    ("output_tok_s", "output tok/s", "{:.1f}"),
    ("output_tok_s_median", "  median of runs", "{:.1f}"),
    ("total_tok_s", "total (in+out) tok/s", "{:.1f}"),
    ("decode_first_token_s", "b=1 first token s", "{:.3f}"),
    ("decode_total_s", "b=1 full run s", "{:.3f}"),
    ("decode_tok_s", "b=1 decode tok/s", "{:.1f}"),
    ("load_s", "load s (untimed)", "{:.1f}"),
    ("side_wall_s", "side wall s", "{:.1f}"),
]


def print_one(f: dict) -> None:
    print(f"== {f['engine']} ({f.get('version', '?')}, torch {f.get('torch', '?')}) ==")
    print(f"model: {f.get('model')}")
    print(f"settings: {json.dumps(f.get('settings', {}))}")
    for key, label, fmt in ROWS:
        if key in f:
            print(f"{label:<24}{fmt.format(f[key]):>12}")
    if "warning" in f:
        print(f"WARNING: {f['warning']}")


def print_compare(ours: dict, peer: dict) -> None:
    print(f"ours: {ours.get('version')} torch {ours.get('torch')}  settings {json.dumps(ours.get('settings'))}")
    print(f"vllm: {peer.get('version')} torch {peer.get('torch')}  settings {json.dumps(peer.get('settings'))}")
    print(f"{'metric':<24}{'ours':>12}{'vllm':>12}{'ours/vllm':>11}")
    for key, label, fmt in ROWS:
        if key not in ours or key not in peer:
            continue
        a, b = ours[key], peer[key]
        ratio = f"{a / b:.2f}x" if b else "-"
        print(f"{label:<24}{fmt.format(a):>12}{fmt.format(b):>12}{ratio:>11}")
    for f in (ours, peer):
        if "warning" in f:
            print(f"WARNING ({f['engine']}): {f['warning']}")


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"want LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.offline", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len-range", type=_range, default=(64, 256), metavar="LO,HI")
    p.add_argument("--output-len-range", type=_range, default=(32, 128), metavar="LO,HI")
    p.add_argument("--vocab-range", type=_range, default=(1000, 40000), metavar="LO,HI",
                   help="token ids drawn from [LO, HI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-tokens", type=int, default=128, help="batch-1 decode run length (>= 2)")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--decode-repeats", type=int, default=1, help="median over this many T(1)/T(N) pairs")
    p.add_argument("--repeats", type=int, default=1,
                   help="time the throughput workload this many times per engine (prefix cache reset between); "
                        "figures from the fastest run, the median beside it")
    p.add_argument("--model", default="smollm2-135m-instruct", help="ours: store name or HF folder")
    p.add_argument("--dtype", default="auto", help="ours: auto|float32|float16|bfloat16")
    p.add_argument("--quantization", default="auto", help="ours: auto|none|int8")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="both engines (default: our EngineConfig default, also given to vLLM)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="both engines (default: our EngineConfig default, also given to vLLM)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache size for both (ours: kv_cache_bytes; vLLM: VLLM_CPU_KVCACHE_SPACE, "
                        "default 4). Default: each engine's own")
    p.add_argument("--peer", choices=["vllm"], default=None, help="run the workload through vLLM instead")
    p.add_argument("--compare", action="store_true", help="run ours, then vLLM, and print both side by side")
    p.add_argument("--vllm-python", default=VLLM_PYTHON)
    p.add_argument("--vllm-model", default=VLLM_MODEL)
    p.add_argument("--vllm-dtype", default="bfloat16")
    p.add_argument("--vllm-max-model-len", type=int, default=4096)
    p.add_argument("--vllm-omp-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND for the peer (vLLM's default 'auto' reserves one core "
                        "for its scheduler process; e.g. '0-1' computes on both)")
    p.add_argument("--json", action="store_true", help="print one JSON object with all figures")
    p.add_argument("-v", "--verbose", action="store_true", help="stream vLLM's logs to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.decode_tokens < 2:
        raise SystemExit("--decode-tokens must be at least 2")
    if args.peer and args.compare:
        raise SystemExit("--peer and --compare are exclusive (--compare runs both)")
    # vLLM gets our scheduler limits unless told otherwise, so both batch the same way.
    from app.engine.config import EngineConfig

    defaults = {f.name: f.default for f in EngineConfig.__dataclass_fields__.values()}
    args._ours_default_seqs = defaults["max_num_seqs"]
    args._ours_default_batched = defaults["max_num_batched_tokens"]

    wl = make_workload(args.num_prompts, args.input_len_range, args.output_len_range, args.seed,
                       args.vocab_range, args.decode_prompt_len, args.decode_tokens, args.decode_repeats,
                       max(1, args.repeats))
    results = {}
    if args.compare or not args.peer:
        raw = run_ours(wl, args)
        raw["loadavg"] = list(os.getloadavg())
        results["ours"] = figures(wl, raw)
        if args.compare:
            print(f"[ours done in {raw['side_wall_s']:.1f}s; starting vLLM]", file=sys.stderr, flush=True)
        elif not args.json:
            print_one(results["ours"])
    if args.compare or args.peer == "vllm":
        raw = run_vllm(wl, args)
        raw["loadavg"] = list(os.getloadavg())
        results["vllm"] = figures(wl, raw)
        if not args.json and not args.compare:
            print_one(results["vllm"])
    if args.compare:
        o, v = results["ours"], results["vllm"]
        results["ratio_ours_over_vllm"] = {k: o[k] / v[k] for k, _, _ in ROWS if k in o and k in v and v[k]}
        if not args.json:
            print_compare(o, v)
    if args.json:
        print(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
