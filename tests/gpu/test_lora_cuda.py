"""Multi-LoRA on CUDA: a random-weight Llama with three adapters (ranks 4/8/16, q+v / attention
with rsLoRA / MLP) mixed with the base model in one batch, float32, token-identical to the same
engine on CPU (whose LoRA path tests/engine/test_lora.py checks against transformers + peft).
Run on a lent GPU: `MXEXT_TEST_TOKENIZER_DIR=<folder with tokenizer.json> pytest tests/gpu -m gpu`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.engine import LLM, LoRARequest, SamplingParams
from app.engine import lora as lora_mod
from tests.engine.reference import PROMPTS, make_random_model

pytestmark = pytest.mark.gpu

ADAPTERS = {"a4": (4, ["q_proj", "v_proj"], False), "b8": (8, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
            "c16": (16, ["gate_proj", "up_proj", "down_proj"], False)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    tok = os.environ.get("MXEXT_TEST_TOKENIZER_DIR")
    tok_dir = Path(tok) if tok else request.getfixturevalue("smollm2_dir")
    root = tmp_path_factory.mktemp("lora-gpu")
    model = make_random_model(root / "model", tok_dir, arch="llama")
    cpu = LLM(str(model), dtype="float32", quantization="none", device="cpu")
    shapes = cpu.engine.lora.module_shapes
    paths = {}
    for k, (name, (r, modules, rslora)) in enumerate(ADAPTERS.items()):
        folder = root / name
        folder.mkdir()
        gen = torch.Generator().manual_seed(k)
        tensors = {}
        for layer in range(cpu.engine.lora.num_layers):
            for m in modules:
                block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                i, o = shapes[m]
                key = f"base_model.model.model.layers.{layer}.{block}.{m}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, i, generator=gen) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(o, r, generator=gen) * 0.3
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_rslora": rslora, "target_modules": modules}))
        paths[name] = str(folder)
    ids = [cpu.tokenizer.encode(p) for p in PROMPTS]
    prompts, loras = [], []
    for prompt in ids:
        for name in (None, *ADAPTERS):
            prompts.append(prompt)
            loras.append(LoRARequest(name, paths[name]) if name else None)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = [o.token_ids for o in cpu.generate(prompts, params, lora_request=loras)]
    return model, prompts, loras, params, expected


@pytest.mark.parametrize("variant", ["masked", "runs", "two-slots"])
def test_cuda_lora_matches_cpu(world, variant, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, prompts, loras, params, expected = world
    if variant == "runs":
        monkeypatch.setattr(lora_mod, "DENSE_MIN_ADAPTERS", 10**9)
    llm = LLM(str(model), dtype="float32", quantization="none", device="cuda",
              max_loras=2 if variant == "two-slots" else 8)
    outs = llm.generate(prompts, params, lora_request=loras)
    assert [o.token_ids for o in outs] == expected
    assert {i.tier for i in llm.engine.list_loras()} <= {"gpu", "cpu"}
