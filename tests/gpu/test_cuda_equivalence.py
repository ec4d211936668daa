"""The engine on CUDA against transformers on CUDA, random-weight Llama shape (no network there).

fp32: token-identical. bf16: both sides run in bf16, whose rounding makes long greedy runs drift
apart after a near-tie; we require the first tokens to agree and a high overall agreement rate.
Run on a lent GPU: `pytest tests/gpu -m gpu` (skips cleanly on CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app.engine import LLM, SamplingParams
from tests.engine.reference import PROMPTS

pytestmark = pytest.mark.gpu


def _tokenizer_dir(request) -> Path:
    env = os.environ.get("MXEXT_TEST_TOKENIZER_DIR")
    if env:
        return Path(env)
    return request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, request):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.engine.reference import copy_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("llama-gpu")
    model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(_tokenizer_dir(request), folder)
    return folder


def _hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids], device="cuda"), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_greedy_matches_transformers(llama_dir, dtype):
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    n = 32
    llm = LLM(str(llama_dir), dtype=dtype, device="cuda", quantization="none", max_num_batched_tokens=64)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype)).cuda().eval()
    agree = total = exact = 0
    for prompt_ids, out in zip(ids, outs):
        ref = _hf_greedy(hf, prompt_ids, n)
        exact += ref == out.token_ids
        first_diff = next((i for i, (a, b) in enumerate(zip(ref, out.token_ids)) if a != b), n)
        agree += first_diff
        total += n
        print(f"{dtype}: prompt of {len(prompt_ids)} tokens agrees for {first_diff}/{n} tokens")
    print(f"{dtype}: {exact}/{len(ids)} sequences identical, {agree}/{total} tokens before the first divergence")
    if dtype == "float32":
        assert exact == len(ids)
    else:
        assert agree / total >= 0.8
