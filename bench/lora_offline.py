"""Multi-LoRA cost on the offline path: base-only throughput against the same workload with
`--adapters` distinct rank-`--rank` adapters spread round-robin over the sequences.

    python -m bench.lora_offline                      # 32 prompts, 8 rank-16 adapters on q_proj,v_proj
    python -m bench.lora_offline --targets all        # adapters on all seven projections

Workload: `bench.offline.make_workload` (random token ids, input 64..256, output 32..128, greedy,
ignore_eos), all prompts in one `generate` call, so `--num-prompts` sequences run concurrently.
Adapters: random PEFT folders written to a temporary directory (B non-zero), loaded before
timing; a warm-up run puts them in their device slots. Base and LoRA runs alternate `--repeats`
times on one engine; ratios of the medians and of the best runs (output tokens/s; on a shared
machine other processes only slow runs down, so the best runs are the cleaner comparison).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.engine import LLM, LoRARequest, SamplingParams
from bench.lora_adapters import TARGETS, write_adapter
from bench.offline import _resolve_ours, make_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode-path", choices=["masked", "runs"], default="masked",
                    help="runs: serve decode rows adapter by adapter (SGMV-style) instead of the masked products")
    args = ap.parse_args()
    if args.decode_path == "runs":
        from app.engine import lora

        lora.DENSE_MIN_ADAPTERS = 10**9

    wl = make_workload(num_prompts=args.num_prompts)
    llm = LLM(model=_resolve_ours(args.model), dtype=args.dtype, quantization=args.quantization,
              max_num_seqs=max(64, args.num_prompts), max_loras=max(8, args.adapters),
              max_cpu_loras=max(16, args.adapters), max_lora_rank=max(32, args.rank), num_threads=args.threads)
    prompts = [list(p) for p in wl["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in wl["output_lens"]]
    config = json.loads((Path(llm.config.model) / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        loras = []
        for k in range(args.adapters):
            write_adapter(Path(tmp) / f"a{k}", config, args.rank, TARGETS[args.targets], seed=k, base_model=args.model)
            loras.append(LoRARequest(f"a{k}", str(Path(tmp) / f"a{k}")))
        per_seq = [loras[i % args.adapters] for i in range(len(prompts))]
        for w in wl["warmup"]:  # warm-up, then once with the adapters so they sit in their slots
            llm.generate([list(p) for p in w["prompts"]], [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                                                           for n in w["output_lens"]])
        llm.generate(prompts[: args.adapters], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                     lora_request=per_seq[: args.adapters])
        llm.engine.block_manager.reset_prefix_cache()
        out_tokens = sum(wl["output_lens"])
        rates: dict[str, list[float]] = {"base": [], "lora": []}
        for _ in range(args.repeats):
            for mode in ("base", "lora"):
                llm.engine.block_manager.reset_prefix_cache()
                t = time.perf_counter()
                llm.generate(prompts, params, lora_request=per_seq if mode == "lora" else None)
                rates[mode].append(out_tokens / (time.perf_counter() - t))
    base, lora = statistics.median(rates["base"]), statistics.median(rates["lora"])
    best = max(rates["lora"]) / max(rates["base"])  # other processes only ever slow a run down
    runner = llm.engine.runner
    print(json.dumps({
        "model": args.model, "dtype": str(runner.dtype).removeprefix("torch."),
        "int8_max_tokens": runner.int8_max_tokens, "threads": torch.get_num_threads(),
        "num_prompts": args.num_prompts, "adapters": args.adapters, "rank": args.rank,
        "targets": TARGETS[args.targets], "decode_path": args.decode_path, "output_tokens": out_tokens,
        "base_tok_s": [round(r, 1) for r in rates["base"]], "lora_tok_s": [round(r, 1) for r in rates["lora"]],
        "ratio_median": round(lora / base, 3), "ratio_best": round(best, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
