"""The bf16 + weight-only int8 path against the fp32 reference: stated tolerances, not exactness.

Tolerances (SmolLM2-135M, 9 prompts; measured: bf16 5.2% and 98.3%, int8 7.7% and 91.7%): logits relative error (‖Δ‖/‖ref‖) below 8% for bf16 and
12% for int8 weights, next-token (top-1) agreement at every prompt position ≥ 90% for bf16 and
≥ 85% for int8, and greedy generations agreeing on ≥ 60% of tokens (measured: 73%) before the first divergence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine import LLM, SamplingParams
from app.engine.models.llama import LlamaModel, ModelConfig
from tests.engine.reference import PROMPTS, prompt_logits


@pytest.fixture(scope="module")
def token_ids(smollm2_dir):
    from app.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(smollm2_dir)
    return [tok.encode(p) for p in PROMPTS]


@pytest.mark.parametrize("variant,max_rel,min_top1", [("bf16", 0.08, 0.90), ("int8", 0.12, 0.85)])
def test_logits_within_tolerance_of_fp32(smollm2_dir, token_ids, variant, max_rel, min_top1):
    folder = Path(smollm2_dir)
    cfg = ModelConfig.from_folder(folder)
    ref_model = LlamaModel(cfg, folder, torch.float32, torch.device("cpu"))
    # int8_max_tokens huge: every step, prefill included, runs the int8 weights.
    test_model = LlamaModel(cfg, folder, torch.bfloat16, torch.device("cpu"),
                            int8_max_tokens=10**9 if variant == "int8" else 0)
    rel_errors, agree, total = [], 0, 0
    for ids in token_ids:
        ref = prompt_logits(ref_model, ids)
        got = prompt_logits(test_model, ids)
        rel_errors.append(((got - ref).norm() / ref.norm()).item())
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        total += len(ids)
    print(f"{variant}: max relative logit error {max(rel_errors):.4f}, top-1 agreement {agree / total:.3f}")
    assert max(rel_errors) < max_rel
    assert agree / total >= min_top1


def test_int8_greedy_generation_mostly_agrees_with_fp32(smollm2_dir, token_ids):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = LLM(str(smollm2_dir), dtype="float32", quantization="none").generate(token_ids, params)
    quant = LLM(str(smollm2_dir), dtype="bfloat16", quantization="int8", max_num_seqs=1)  # decode steps of 1 row: int8
    got = quant.generate(token_ids, params)
    same = 0
    for r, g in zip(ref, got):
        same += next((i for i, (a, b) in enumerate(zip(r.token_ids, g.token_ids)) if a != b), len(r.token_ids))
    rate = same / sum(len(r.token_ids) for r in ref)
    print(f"int8 greedy: {rate:.3f} of tokens before the first divergence")
    assert rate >= 0.60
