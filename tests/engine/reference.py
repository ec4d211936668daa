"""Helpers shared by the engine tests: reference generation with HF transformers, tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):",
    "你好，你好吗？",
    "Once upon a time, in a land far far away, there lived a king who had three daughters. The eldest was",
    "1, 2, 3, 4,",
    "Write a haiku about the sea.\n",
    "The quick brown fox",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.",
]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **kwargs,
    )
    return out[0, len(prompt_ids):].tolist()


def make_random_model(folder: Path, tokenizer_dir: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """A small random-weight model of the given architecture, with the SmolLM2 tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
        # Random biases on q/k/v: Qwen2's distinguishing feature must be exercised.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    else:
        model = LlamaForCausalLM(LlamaConfig(
            **common, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
        ))
    # Larger weights than the default init, so logits are far from uniform and greedy is decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, folder)
    return folder


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def prompt_logits(model, ids: list[int], lora_batch=None) -> torch.Tensor:
    """Float32 logits at every position of one prompt, run through `model` as a single prefill."""
    from app.engine.layers.attention import AttentionMetadata, PrefillSlice

    cfg = model.cfg
    n = len(ids)
    blocks = -(-n // 16)
    caches = [(torch.zeros(blocks, cfg.num_kv_heads, cfg.head_dim, 16, dtype=model.dtype),
               torch.zeros(blocks, 16, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype)) for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), num_decode=0, decode_block_tables=None,
                             decode_context_lens=[], decode_mask=None,
                             prefills=[PrefillSlice(0, n, n, torch.arange(blocks), None)])
    return model.logits(model.forward(torch.tensor(ids), torch.arange(n), caches, meta, lora_batch)).float()
