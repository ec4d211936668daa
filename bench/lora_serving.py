"""Multi-LoRA over HTTP: base-only against an 8-adapter mix on the same server, ours and vLLM's CPU
build side by side, plus the time from a load call returning to the adapter's first token.

    python -m bench.lora_serving                       # both servers, q/v adapters
    python -m bench.lora_serving --targets all         # adapters on all seven projections
    python -m bench.lora_serving --servers ours        # ours only

For each server in turn (one at a time, so they do not share the two cores): start it with
runtime LoRA updating on, write `--adapters` random rank-`--rank` PEFT adapters (B non-zero) for
the SmolLM2 model, load them through `POST /v1/load_lora_adapter`, then time a fresh adapter:
from the load call returning to the first streamed token of a request naming it. Then
`--repeats` alternating runs of the performance tester (bench.serving): `--num-prompts` random
prompts (input `--input-len`, output `--output-len`, ignore_eos, greedy) at `--concurrency`
streams, once all on the base model and once spread evenly over the adapters (equal weights).
Prints output tokens/s of each run and the ratio LoRA / base (best runs: on a shared machine
other processes only slow runs down).

vLLM's server is the peer script ../shared/peers/serve_vllm_cpu.sh (`--enable-lora
--max-lora-rank 64`, its defaults otherwise: `--max-loras 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.lora_adapters import TARGETS, write_adapter

REPO = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS_HOME", "~/.cache/mxext-peers")).expanduser()
SERVE_VLLM = REPO.parent / "shared" / "peers" / "serve_vllm_cpu.sh"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering /health")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout:.0f}s")


def start_server(kind: str, port: int, adapters_dir: Path, log) -> subprocess.Popen:
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="true")
    if kind == "ours":
        env["VLLM_MXEXT_LORA_ROOTS"] = str(adapters_dir)
        cmd = [str(REPO / ".venv" / "bin" / "mxext"), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-lora-rank", "64"]
    else:
        cmd = ["bash", str(SERVE_VLLM), str(port)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()


def load_to_first_token(base: str, name: str, path: Path) -> tuple[float, float]:
    """(seconds the load call took, seconds from its return to the first streamed token)."""
    t0 = time.perf_counter()
    post(base + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    loaded = time.perf_counter()
    body = {"model": name, "prompt": "Hello, my name is", "max_tokens": 4, "temperature": 0, "stream": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: ") and b'"text"' in line:
                first = time.perf_counter()
                break
        else:
            raise RuntimeError("no token streamed")
        r.read()
    return loaded - t0, first - loaded


def run_tester(base: str, tokenizer: Path, a: argparse.Namespace, lora: dict[str, float] | None, seed: int) -> float:
    from bench.serving.cli import execute
    from bench.serving.options import BenchOptions

    opts = BenchOptions(model=MODEL, server_url=base, endpoint="completions", dataset="random",
                        num_prompts=a.num_prompts, input_len=a.input_len, output_len=a.output_len,
                        ignore_eos=True, temperature=0.0, tokenizer=str(tokenizer), lora=lora, seed=seed,
                        concurrent_requests=a.concurrency, num_warmups=1, save=False, plot=False, progress=False)
    metrics = execute(opts.check(), print_report=False)["aggregate"]
    failed = metrics.get("failed_requests", 0)
    if failed:
        raise RuntimeError(f"{failed} requests failed")
    return float(metrics["overall_throughput"])


def bench_server(kind: str, a: argparse.Namespace, adapters: list[Path], probe: Path, tokenizer: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.gettempdir()) / f"lora_serving_{kind}.log"
    with open(log_path, "w") as log:
        proc = start_server(kind, port, probe.parent, log)
        try:
            wait_ready(base, proc)
            names = [p.name for p in adapters]
            for path in adapters:
                post(base + "/v1/load_lora_adapter", {"lora_name": path.name, "lora_path": str(path)})
            load_s, first_token_s = load_to_first_token(base, probe.name, probe)
            print(f"  {kind}: load call {load_s:.3f} s, load returned -> first token {first_token_s:.3f} s", flush=True)
            runs = {"base": [], "lora": []}
            for r in range(a.repeats):
                seed = a.seed + r
                runs["base"].append(run_tester(base, tokenizer, a, None, seed))
                runs["lora"].append(run_tester(base, tokenizer, a, {name: 1.0 for name in names}, seed))
                print(f"  {kind} repeat {r}: base {runs['base'][-1]:.1f} tok/s, "
                      f"LoRA mix {runs['lora'][-1]:.1f} tok/s", flush=True)
        finally:
            stop_server(proc)
    best_base, best_lora = max(runs["base"]), max(runs["lora"])
    return {"server": kind, "load_s": load_s, "load_to_first_token_s": first_token_s, "base": runs["base"],
            "lora": runs["lora"], "best_base": best_base, "best_lora": best_lora, "ratio": best_lora / best_base,
            "log": str(log_path)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="ours,vllm", help="comma list of ours, vllm")
    ap.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from app.hub.store import ModelStore
    from app.settings import get_settings

    model_dir = ModelStore(get_settings().store.home).resolve(MODEL)
    config = json.loads((model_dir / "config.json").read_text())
    root = Path(tempfile.mkdtemp(prefix="mxext-lora-bench-"))
    adapters = []
    for i in range(a.adapters):
        adapters.append(root / f"bench-{a.targets}-{i}")
        write_adapter(adapters[-1], config, a.rank, TARGETS[a.targets], seed=i)
    probe = root / f"bench-{a.targets}-probe"
    write_adapter(probe, config, a.rank, TARGETS[a.targets], seed=1000)

    results = []
    for kind in [s.strip() for s in a.servers.split(",") if s.strip()]:
        if kind == "vllm" and not (PEERS / "vllm-venv" / "bin" / "python").exists():
            print("vLLM peer not installed: bash ../shared/peers/setup_vllm_cpu.sh", file=sys.stderr)
            continue
        print(f"{kind}: {a.adapters} rank-{a.rank} adapters on {a.targets}, {a.num_prompts} prompts at "
              f"concurrency {a.concurrency}", flush=True)
        results.append(bench_server(kind, a, adapters, probe, model_dir))

    print("\nserver  base tok/s  LoRA-mix tok/s  LoRA/base  load call s  load->first token s")
    for r in results:
        print(f"{r['server']:6s}  {r['best_base']:10.1f}  {r['best_lora']:14.1f}  {r['ratio']:9.2f}  "
              f"{r['load_s']:11.3f}  {r['load_to_first_token_s']:19.3f}")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
