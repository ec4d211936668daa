"""Engine throughput on a CUDA device with a random-weight Llama shape (no downloads needed).

python -m bench.engine_gpu --tokenizer DIR [--layers 16 --hidden 2048]
Prints batch-1 decode tokens/s and batched output tokens/s. Eager mode: no CUDA graphs yet.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build(folder: Path, tokenizer: Path, layers: int, hidden: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.engine.reference import copy_tokenizer

    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(tokenizer, folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="print the top ops of 16 batch-1 decode steps")
    args = ap.parse_args()
    from app.engine import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), Path(args.tokenizer), args.layers, args.hidden)
        llm = LLM(tmp, dtype="bfloat16", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                  kv_cache_bytes=8 << 30)
        ids = list(range(1000, 1128))
        greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        llm.generate([ids], greedy)
        t = time.perf_counter()
        llm.generate([ids], greedy)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True))
        t129 = time.perf_counter() - t
        print(f"batch-1 decode: {128 / (t129 - t1):.1f} tokens/s")
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        prompts = [[1000 + (i * 7 + j) % 30000 for j in range(256)] for i in range(args.batch)]
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True))
        dt = time.perf_counter() - t
        n = sum(len(o.token_ids) for o in outs)
        print(f"batch of {args.batch} x (256 in, 128 out): {n / dt:.0f} output tokens/s ({dt:.1f} s)")


if __name__ == "__main__":
    main()
