"""Reading PEFT adapters: what is accepted (scaling folded into B) and every refusal, with its reason."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.adapters.peft import read_peft_adapter

# A tiny model: hidden 8, 2 query heads of 4, 1 KV head, MLP 16, 2 layers.
SHAPES = {"q_proj": (8, 8), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (8, 8),
          "gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}
LAYERS = 2
BLOCK = {m: ("mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn") for m in SHAPES}


def make_adapter(folder: Path, *, r: int = 4, modules=("q_proj", "v_proj"), config: dict | None = None,
                 tensors: dict | None = None, layers: int = LAYERS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules), "bias": "none",
           "use_dora": False, "use_rslora": False, "modules_to_save": None}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        gen = torch.Generator().manual_seed(0)
        tensors = {}
        for layer in range(layers):
            for m in modules:
                i, o = SHAPES[m]
                key = f"base_model.model.model.layers.{layer}.{BLOCK[m]}.{m}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, i, generator=gen)
                tensors[f"{key}.lora_B.weight"] = torch.randn(o, r, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def read(folder: Path, max_rank: int = 32):
    return read_peft_adapter(folder, SHAPES, LAYERS, max_rank)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_reads_adapter_and_folds_the_scaling_into_b(tmp_path):
    folder = make_adapter(tmp_path / "a", r=4, modules=("q_proj", "v_proj", "down_proj"))
    adapter = read(folder)
    raw = tensors_of(folder)
    assert adapter.rank == 4 and adapter.target_modules == ["q_proj", "v_proj", "down_proj"]
    a, b = adapter.weights[(1, "down_proj")]
    key = "base_model.model.model.layers.1.mlp.down_proj"
    assert torch.equal(a, raw[f"{key}.lora_A.weight"])
    assert torch.allclose(b, raw[f"{key}.lora_B.weight"] * (8 / 4))  # lora_alpha / r


def test_rslora_and_rank_and_alpha_patterns(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for m, r in (("q_proj", 4), ("v_proj", 2)):
        i, o = SHAPES[m]
        key = f"base_model.model.model.layers.0.self_attn.{m}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, i, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(o, r, generator=gen)
    folder = make_adapter(tmp_path / "a", r=4, config={"use_rslora": True, "lora_alpha": 6,
                                                       "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                          tensors=tensors)
    adapter = read(folder)
    assert adapter.rank == 4
    q_b = tensors[f"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    v_b = tensors[f"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert torch.allclose(adapter.weights[(0, "q_proj")][1], q_b * (6 / math.sqrt(4)))
    assert torch.allclose(adapter.weights[(0, "v_proj")][1], v_b * (3 / math.sqrt(2)))


@pytest.mark.parametrize("config,why", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"bias": "lora_only"}, "biases are not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "fc1"]}, "target module(s) ['fc1'] are not in this model"),
    ({"peft_type": "IA3"}, "not LoRA"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"r": 0}, "positive integer"),
])
def test_refused_configs_say_why(tmp_path, config, why):
    folder = make_adapter(tmp_path / "a", config=config)
    with pytest.raises(ValueError, match=__import__("re").escape(why)):
        read(folder)


def test_rank_above_the_limit(tmp_path):
    with pytest.raises(ValueError, match=r"rank 64 exceeds max_lora_rank=32"):
        read(make_adapter(tmp_path / "a", r=64))
    read(make_adapter(tmp_path / "b", r=64), max_rank=64)


def test_rank_above_the_limit_in_the_tensors_alone(tmp_path):
    folder = make_adapter(tmp_path / "a", r=4)
    t = tensors_of(folder)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    t[f"{key}.lora_A.weight"] = torch.zeros(40, 8)
    t[f"{key}.lora_B.weight"] = torch.zeros(8, 40)
    save_file(t, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="rank 40, above max_lora_rank=32"):
        read(folder)


class _Bomb:
    """Unpickling this writes a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


@pytest.mark.parametrize("filename", ["adapter_model.bin", "adapter_model.pt", "weights.pth"])
def test_pickle_weights_are_refused_without_being_unpickled(tmp_path, filename):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
    marker = tmp_path / "marker"
    (folder / filename).write_bytes(pickle.dumps(_Bomb(marker)))
    with pytest.raises(ValueError, match=f"pickle.*{filename}.*never loaded"):
        read(folder)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(tmp_path):
    folder = make_adapter(tmp_path / "a")
    marker = tmp_path / "marker"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Bomb(marker)))
    assert read(folder).rank == 4
    assert not marker.exists()


def test_missing_things(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        read(tmp_path / "file")
    folder = make_adapter(tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        read(folder)
    folder = make_adapter(tmp_path / "b")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        read(folder)


def test_malformed_files(tmp_path):
    folder = make_adapter(tmp_path / "a")
    (folder / "adapter_config.json").write_text('{"r": 4, ')
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        read(folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        read(folder)
    folder = make_adapter(tmp_path / "b")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read(folder)


def _edit(folder: Path, change) -> Path:
    t = tensors_of(folder)
    change(t)
    save_file(t, str(folder / "adapter_model.safetensors"))
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change,why", [
    (lambda t: t.__setitem__(f"{Q}.lora_A.weight", torch.zeros(4, 12)), r"do not fit the base model \(expected A \[r, 8\]"),
    (lambda t: t.__setitem__(f"{Q}.lora_B.weight", torch.zeros(6, 4)), "do not fit the base model"),
    (lambda t: t.__setitem__(f"{Q}.lora_B.weight", torch.zeros(8, 3)), "do not fit the base model"),
    (lambda t: t.pop(f"{Q}.lora_B.weight"), "lora_A without lora_B"),
    (lambda t: t.__setitem__("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", torch.zeros(4, 8)),
     "layer 5, but the model has 2 layers"),
    (lambda t: t.__setitem__(f"{Q}.lora_magnitude_vector", torch.zeros(8)), "DoRA"),
    (lambda t: t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 8)),
     "embeddings or the LM head"),
    (lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.fc1.lora_A.weight", torch.zeros(4, 8)),
     "target module 'fc1'"),
    (lambda t: t.__setitem__(f"{Q}.lora_B.bias", torch.zeros(8)), "trained bias"),
    (lambda t: t.__setitem__(f"{Q}.lora_A.weight", torch.full((4, 8), float("nan"))), "NaN"),
])
def test_tensors_that_do_not_fit_are_refused(tmp_path, change, why):
    folder = _edit(make_adapter(tmp_path / "a"), change)
    with pytest.raises(ValueError, match=why):
        read(folder)


def test_tensor_rank_must_match_the_config(tmp_path):
    folder = make_adapter(tmp_path / "a", r=4, config={"r": 8})
    with pytest.raises(ValueError, match="tensors have rank 4 but the config says r=8"):
        read(folder)


def test_target_modules_all_linear_and_regex_are_accepted(tmp_path):
    assert read(make_adapter(tmp_path / "a", config={"target_modules": "all-linear"})).target_modules == ["q_proj", "v_proj"]
    assert read(make_adapter(tmp_path / "b", config={"target_modules": r".*\.(q_proj|v_proj)"})).rank == 4
