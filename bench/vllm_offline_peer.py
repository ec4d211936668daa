"""vLLM side of `python -m bench.offline --peer vllm`: runs under vLLM's own venv.

Standalone on purpose: it must not import the `app` package (different venv, different torch build).

    VLLM_CPU_KVCACHE_SPACE=4 ~/.cache/mxext-peers/vllm-venv/bin/python bench/vllm_offline_peer.py WORKLOAD.json

WORKLOAD.json is written by bench.offline (`make_workload` + settings). Logs go wherever vLLM sends
them; the figures are the LAST line of stdout, one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "~/.cache/mxext-peers/smollm2-hf"


def _prompt(ids):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def _params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)


def _timed(llm, prompts, max_tokens_list) -> tuple[float, list]:
    ps = [_prompt(p) for p in prompts]
    sps = [_params(m) for m in max_tokens_list]
    t0 = time.perf_counter()
    outs = llm.generate(ps, sps, use_tqdm=False)
    return time.perf_counter() - t0, outs


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    wl = json.loads(Path(argv[0]).read_text())
    settings = wl.get("settings", {})
    model = str(Path(settings.get("vllm_model") or DEFAULT_MODEL).expanduser())

    t_start = time.perf_counter()
    import torch
    import vllm
    from vllm import LLM

    llm_kwargs = dict(
        model=model,
        dtype=settings.get("vllm_dtype", "bfloat16"),
        max_model_len=int(settings.get("max_model_len", 4096)),
        seed=int(wl.get("seed", 0)),
    )
    if settings.get("max_num_seqs"):
        llm_kwargs["max_num_seqs"] = int(settings["max_num_seqs"])
    if settings.get("max_num_batched_tokens"):
        llm_kwargs["max_num_batched_tokens"] = int(settings["max_num_batched_tokens"])
    llm = LLM(**llm_kwargs)
    load_s = time.perf_counter() - t_start

    # Warm-up: the same short generations bench.offline gives our engine.
    t0 = time.perf_counter()
    for batch in wl["warmup"]:
        _timed(llm, batch["prompts"], batch["output_lens"])
    warmup_s = time.perf_counter() - t0

    # Throughput: the fixed workload, all prompts in one generate() call.
    runs = []
    for _ in range(int(wl.get("throughput_repeats", 1))):
        llm.reset_prefix_cache()  # each run prefills from scratch
        elapsed, outs = _timed(llm, wl["prompts"], wl["output_lens"])
        runs.append(elapsed)
    produced = [len(o.outputs[0].token_ids) for o in outs]

    # Batch-1 decode: T(N) - T(1) over N-1 tokens, distinct prompts (no prefix-cache hits).
    dec = wl["decode"]
    t1s, tns = [], []
    for rep in range(int(dec.get("repeats", 1))):
        t1, _ = _timed(llm, [dec["prompts_first"][rep]], [1])
        tn, o = _timed(llm, [dec["prompts_full"][rep]], [dec["tokens"]])
        if len(o[0].outputs[0].token_ids) != dec["tokens"]:
            raise RuntimeError(f"decode run produced {len(o[0].outputs[0].token_ids)} tokens, wanted {dec['tokens']}")
        t1s.append(t1)
        tns.append(tn)

    result = {
        "engine": "vllm",
        "version": vllm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": model,
        "settings": {
            **{k: v for k, v in llm_kwargs.items() if k != "model"},
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
            "frontend_torch_threads": torch.get_num_threads(),
        },
        "load_s": load_s,
        "warmup_s": warmup_s,
        "elapsed_s": min(runs),
        "elapsed_runs_s": runs,
        "produced_output_tokens": sum(produced),
        "short_outputs": sum(1 for p, want in zip(produced, wl["output_lens"]) if p != want),
        "decode_t1_s": t1s,
        "decode_tn_s": tns,
    }
    _shutdown(llm)  # so vLLM's shutdown logs come before the figures, not after them
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return 0


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # best effort: bench.offline finds the JSON line either way
        print(f"engine shutdown failed: {exc!r}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
