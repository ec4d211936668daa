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
