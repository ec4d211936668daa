"""Tiny PEFT adapter folders for tests that need the files, not a model (registry, reconciler)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_peft_folder(folder: Path, *, seed: int = 0, r: int = 4, layers: int = 2, hidden: int = 8) -> Path:
    """A LoRA on q_proj and v_proj of a `hidden`-wide model of `layers` layers; `seed` picks the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
              "bias": "none", "base_model_name_or_path": "tiny-llama"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, r, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def make_gqa_lora(folder: Path) -> tuple[Path, Path]:
    """A rank-2 PEFT adapter on q/v of one layer of a tiny GQA model (q 8 wide, v 4), in
    `folder`/peft, and that model's config.json in `folder`/base: what the conversion jobs need."""
    peft, base = folder / "peft", folder / "base"
    peft.mkdir(parents=True)
    base.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for module, out in (("q_proj", 8), ("v_proj", 4)):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
    save_file(tensors, str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny"}))  # fmt: skip
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
        "intermediate_size": 16, "vocab_size": 32, "head_dim": 4}))  # fmt: skip
    return peft, base
