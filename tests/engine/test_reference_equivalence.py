"""Greedy outputs token-identical to HF transformers (fp32, CPU) under every scheduling regime."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine import LLM, SamplingParams
from tests.engine.reference import PROMPTS, hf_greedy, make_random_model

MAX_NEW = 24


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir, smollm2_hf):
    llm = LLM(str(smollm2_dir), dtype="float32", quantization="none")
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    return ids, [hf_greedy(smollm2_hf, i, MAX_NEW) for i in ids]


def _greedy(max_tokens=MAX_NEW):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_smollm2_batch_matches_transformers(smollm2_dir, smollm2_reference):
    ids, expected = smollm2_reference
    assert len({len(i) for i in ids}) >= 6, "prompts of mixed lengths"
    llm = LLM(str(smollm2_dir), dtype="float32", quantization="none")
    outs = llm.generate(ids, _greedy())
    for got, want in zip(outs, expected):
        assert got.token_ids == want


def test_smollm2_with_prefix_cache_hits_matches_transformers(smollm2_dir, smollm2_reference):
    ids, expected = smollm2_reference
    llm = LLM(str(smollm2_dir), dtype="float32", quantization="none", enable_prefix_caching=True)
    llm.generate(ids, _greedy(2))  # warm the prefix cache
    outs = llm.generate(ids, _greedy())
    assert llm.engine.block_manager.prefix_hits > 0
    for got, want in zip(outs, expected):
        assert got.token_ids == want


def test_smollm2_under_preemption_and_chunked_prefill_matches_transformers(smollm2_dir, smollm2_reference):
    ids, expected = smollm2_reference
    # 12 blocks of 16 tokens cannot hold 9 sequences at once: the scheduler must preempt; a 32-token
    # budget splits the long prompts into chunks.
    llm = LLM(str(smollm2_dir), dtype="float32", quantization="none", num_kv_blocks=12,
              max_num_batched_tokens=32, enable_prefix_caching=False)
    outs = llm.generate(ids, _greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    for got, want in zip(outs, expected):
        assert got.token_ids == want
    assert llm.engine.block_manager.usage() == 0.0


@pytest.mark.parametrize("arch", ["qwen2", "llama3"])
def test_random_weight_models_match_transformers(arch, tmp_path, smollm2_dir):
    folder = make_random_model(tmp_path / arch, smollm2_dir, arch=arch)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(str(folder), dtype="float32", quantization="none", max_num_batched_tokens=40)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    for prompt_ids, got in zip(ids, outs):
        assert got.token_ids == hf_greedy(hf, prompt_ids, 16, min_new_tokens=16, eos_token_id=None)


def test_repetition_penalty_and_min_tokens_match_transformers(smollm2_dir, smollm2_hf):
    llm = LLM(str(smollm2_dir), dtype="float32", quantization="none")
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[:4]]
    outs = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3, min_tokens=20))
    for prompt_ids, got in zip(ids, outs):
        want = hf_greedy(smollm2_hf, prompt_ids, 20, repetition_penalty=1.3, min_new_tokens=20)
        assert got.token_ids == want


def test_logprobs_match_transformers(smollm2_dir, smollm2_hf):
    llm = LLM(str(smollm2_dir), dtype="float32", quantization="none")
    ids = llm.tokenizer.encode("The capital of France is")
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=3, logprobs=5))[0]
    seq = list(ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            ref = torch.log_softmax(smollm2_hf(torch.tensor([seq])).logits[0, -1].float(), -1)
        assert entry[token].rank == 1
        assert abs(entry[token].logprob - ref[token].item()) < 1e-4
        top = ref.topk(5)
        assert set(entry) == set(top.indices.tolist())
        seq.append(token)
