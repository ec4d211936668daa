"""Random PEFT adapters for the LoRA benchmarks (bench.lora_offline, bench.lora_serving): B non-zero,
so the adapter term is really computed, alpha = 2r."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def write_adapter(folder: Path, config: dict, rank: int, modules: tuple[str, ...], seed: int,
                  base_model: str = "smollm2-135m-instruct") -> None:
    """A PEFT adapter of random weights for a Llama-shaped `config` (B non-zero, alpha = 2r)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    inter = config["intermediate_size"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for m in modules:
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            i, o = shapes[m]
            key = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / i**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(o, rank, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules), "bias": "none",
         "base_model_name_or_path": base_model}))
