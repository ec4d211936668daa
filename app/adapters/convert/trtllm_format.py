"""TensorRT-LLM LoRA files: `model.lora_config.npy` + `model.lora_weights.npy` in one folder.

Layout, from NVIDIA/TensorRT-LLM (examples/hf_lora_convert.py writes it, tensorrt_llm/lora_manager.py
builds the same tensors, cpp/tensorrt_llm/runtime/loraUtils.cpp validates them):
* lora_config: int32 [1, modules, 3] rows `[module_id, layer_idx, adapter_size]`; newer writers add
  a 4th column `is_dora` (the C++ runtime accepts 3 or 4 columns).
* lora_weights: [1, modules, max_row] in the engine's dtype (float16 by default; the C++ .npy
  loader knows f2 and f4 only); each row is A [r, in] flattened, then B [out, r] flattened with the
  scale (alpha / r, or alpha / sqrt(r) with use_rslora) already multiplied in, zero-padded.
* module ids (LoraManager.LORA_MODULE_IDS) and the Llama mapping (get_default_trtllm_modules_to_hf_modules):
  1 attn_q=q_proj, 2 attn_k=k_proj, 3 attn_v=v_proj, 4 attn_dense=o_proj, 5 mlp_h_to_4h=gate_proj,
  6 mlp_4h_to_h=down_proj, 7 mlp_gate=up_proj; fused 0 attn_qkv = [q; k; v] and 18 mlp_gate_up =
  [up; gate] (both loaders swap HF's [gate; up] halves before writing it).

The files keep neither alpha nor the model's dimensions (a row's length is padded), so the writer
adds `mxext_adapter.json` (ignored by TensorRT-LLM) with the PEFT config and each module's shape.
Without it, reading needs base_model for the dimensions and gives alpha = r (scale 1), which is
exactly what the files compute.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from app.adapters.convert.adapter import (
    DTYPE_NAMES,
    SIDECAR_FILE,
    SIDECAR_VERSION,
    Adapter,
    LoraModule,
    ModelLayout,
    build_peft_config,
    module_scale,
    parse_sidecar,
    peft_module_params,
    scale_b,
    usable_peft_config,
)
from app.adapters.convert.detect import TRT_CONFIG, TRT_WEIGHTS
from app.jobs.context import JobError

MODULE_IDS = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 5, "down_proj": 6, "up_proj": 7}
_BY_ID = {i: m for m, i in MODULE_IDS.items()}
_FUSED_IDS = {0: ("q_proj", "k_proj", "v_proj"), 18: ("up_proj", "gate_proj")}
_NAMES = {0: "attn_qkv", 8: "cross_attn_qkv", 9: "cross_attn_q", 10: "cross_attn_k", 11: "cross_attn_v",
          12: "cross_attn_dense", 13: "moe_h_to_4h", 14: "moe_4h_to_h", 15: "moe_gate", 16: "moe_router",
          17: "mlp_router", 18: "mlp_gate_up"}
_STORAGE = {torch.float16: torch.float16, torch.float32: torch.float32, torch.bfloat16: torch.float32}
OUTPUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# -- reading ---------------------------------------------------------------------------------------


def read_trtllm(folder: Path, layout: ModelLayout | None, tick: Callable[[], None]) -> Adapter:
    config = _load(folder, TRT_CONFIG)
    weights = _load(folder, TRT_WEIGHTS)
    if config.ndim == 3 and config.shape[0] == 1:
        config = config[0]
    if weights.ndim == 3 and weights.shape[0] == 1:
        weights = weights[0]
    if config.ndim != 2 or config.shape[1] not in (3, 4) or config.dtype.kind not in "iu":
        raise JobError(f"{TRT_CONFIG} must be integers shaped [1, modules, 3 or 4], got {config.dtype} {config.shape}")
    if weights.ndim != 2 or weights.shape[0] != config.shape[0]:
        raise JobError(f"{TRT_WEIGHTS} must be shaped [1, modules, size] with one row per {TRT_CONFIG} row; got "
                       f"{weights.shape} for {config.shape[0]} modules")
    table = _as_torch(weights)
    sidecar = parse_sidecar(_read_optional(folder / SIDECAR_FILE))
    shapes = _module_shapes(sidecar, layout)

    modules: dict[tuple[int, str], LoraModule] = {}
    for row, entry in enumerate(config.tolist()):
        tick()
        module_id, layer, rank = entry[:3]
        if len(entry) == 4 and entry[3]:
            raise JobError(f"{TRT_CONFIG} row {row} is a DoRA module; DoRA adapters do not convert")
        if rank < 1 or layer < 0 or (layout and layout.num_layers and layer >= layout.num_layers):
            raise JobError(f"{TRT_CONFIG} row {row}: layer {layer} / adapter_size {rank} is out of range")
        for module, a, b in _split_row(row, module_id, rank, table[row], shapes):
            if (layer, module) in modules:
                raise JobError(f"{TRT_CONFIG} lists layer {layer} {module} twice")
            modules[(layer, module)] = LoraModule(a, b, float(a.shape[0]))  # alpha = r: the scale is in B
    if not modules:
        raise JobError(f"{TRT_WEIGHTS} holds no LoRA modules")
    generic = Adapter(modules, layout=layout)
    return _restore_original(generic, sidecar) or generic


def _load(folder: Path, name: str) -> np.ndarray:
    file = folder / name
    if not file.is_file():
        raise JobError(f"{folder}: {name} is missing; TensorRT-LLM LoRA needs {TRT_CONFIG} and {TRT_WEIGHTS}")
    try:
        return np.load(file, allow_pickle=False)  # an object array would need unpickling: refused
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise JobError(f"{file.name} holds pickled objects, which are never loaded; write plain numeric "
                           "arrays (np.save of an int32 / float16 / float32 array)") from None
        raise JobError(f"{file.name} is not a readable .npy array (corrupt or truncated: {exc})") from None
    except (EOFError, OSError) as exc:
        raise JobError(f"{file.name} is not a readable .npy array (corrupt or truncated: {exc})") from None


def _read_optional(file: Path) -> bytes | None:
    return file.read_bytes() if file.is_file() else None


def _as_torch(weights: np.ndarray) -> torch.Tensor:
    if weights.dtype.kind == "V" and weights.dtype.itemsize == 2:
        # TensorRT-LLM's torch_to_numpy writes bfloat16 as 2-byte void: reinterpret the bits.
        return torch.from_numpy(np.ascontiguousarray(weights).view(np.int16)).view(torch.bfloat16)
    if weights.dtype not in (np.float16, np.float32):
        raise JobError(f"{TRT_WEIGHTS} has dtype {weights.dtype}; LoRA weights are float16 or float32")
    return torch.from_numpy(np.ascontiguousarray(weights))


def _module_shapes(sidecar: dict | None, layout: ModelLayout | None) -> dict[str, tuple[int, int]]:
    if sidecar and isinstance(sidecar.get("module_shapes"), dict):
        try:
            return {m: (int(s[0]), int(s[1])) for m, s in sidecar["module_shapes"].items() if m in MODULE_IDS}
        except (TypeError, ValueError, IndexError):
            pass
    if layout is not None:
        return layout.module_shapes()
    raise JobError(f"the TensorRT-LLM files do not record the model's dimensions (rows are zero-padded) and there "
                   f"is no {SIDECAR_FILE}: pass base_model (a model in the store, or a folder with its config.json)")


def _split_row(row: int, module_id: int, rank: int, values: torch.Tensor,
               shapes: dict[str, tuple[int, int]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    members = _FUSED_IDS.get(module_id) or ((_BY_ID[module_id],) if module_id in _BY_ID else None)
    if members is None:
        raise JobError(f"{TRT_CONFIG} row {row}: module {_NAMES.get(module_id, module_id)} has no Llama projection "
                       f"to convert to; supported module ids: {sorted([*_BY_ID, *_FUSED_IDS])}")
    missing = [m for m in members if m not in shapes]
    if missing:
        raise JobError(f"{TRT_CONFIG} row {row}: the shape of {', '.join(missing)} is unknown; pass base_model")
    in_f = shapes[members[0]][0]
    outs = [shapes[m][1] for m in members]
    used = rank * (in_f + sum(outs))
    if used > values.numel() or torch.count_nonzero(values[used:]):
        raise JobError(f"{TRT_WEIGHTS} row {row} does not fit layer shapes in={in_f} out={sum(outs)} at rank "
                       f"{rank}; the base model's dimensions do not match this adapter")
    a = values[: rank * in_f].reshape(rank, in_f).clone()
    b = values[rank * in_f: used].reshape(sum(outs), rank)
    return [(m, a, part.clone()) for m, part in zip(members, b.split(outs))]


def _restore_original(generic: Adapter, sidecar: dict | None) -> Adapter | None:
    """Undo the folded scale with our sidecar's PEFT config, if dividing it out is exact: the
    restored B times the scale gives back the stored bits (B itself is bit-identical whenever the
    scale is a power of two; otherwise it may differ in the last bit, never in what it computes)."""
    if sidecar is None or sidecar.get("format") != "trtllm":
        return None
    cfg = usable_peft_config(sidecar.get("peft_config"))
    dtype = {v: k for k, v in DTYPE_NAMES.items()}.get(sidecar.get("dtype"))
    if cfg is None or dtype is None:
        return None
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, module), stored in generic.modules.items():
        rank, alpha = peft_module_params(cfg, layer, module)
        if rank != stored.rank:
            return None
        scale = module_scale(alpha, rank, use_rslora)
        a = stored.a.to(dtype)
        b = (stored.b.to(torch.float32) / scale).to(dtype)
        if not (torch.equal(a.to(stored.a.dtype), stored.a) and torch.equal(scale_b(b, scale, stored.b.dtype), stored.b)):
            return None
        modules[(layer, module)] = LoraModule(a, b, alpha)
    return Adapter(modules, use_rslora=use_rslora, peft_config=cfg, base_model=cfg.get("base_model_name_or_path"),
                   layout=generic.layout)


# -- writing ---------------------------------------------------------------------------------------


def write_trtllm(adapter: Adapter, folder: Path, dtype: torch.dtype | None, tick: Callable[[], None]) -> None:
    """Rows in (layer, module) order, as hf_lora_convert.py writes them; `dtype` None keeps float16
    and float32 adapters as they are and stores bfloat16 ones as float32 (exact; .npy has no bfloat16)."""
    storage = dtype or _STORAGE.get(adapter.dtype, torch.float32)
    rows, config = [], []
    for (layer, module), weights in adapter.sorted_items():
        tick()
        b = scale_b(weights.b, adapter.scale((layer, module)), storage)
        rows.append(torch.cat([weights.a.to(storage).flatten(), b.flatten()]))
        config.append([MODULE_IDS[module], layer, weights.rank])
    width = max(r.numel() for r in rows)
    table = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows]).unsqueeze(0)
    np.save(folder / TRT_WEIGHTS, table.numpy(), allow_pickle=False)
    np.save(folder / TRT_CONFIG, np.asarray([config], dtype=np.int32), allow_pickle=False)
    shapes = {m: [w.a.shape[1], w.b.shape[0]] for (_, m), w in adapter.sorted_items()}
    sidecar = {"version": SIDECAR_VERSION, "format": "trtllm", "peft_config": build_peft_config(adapter),
               "module_shapes": shapes, "dtype": DTYPE_NAMES.get(adapter.dtype, "float32")}
    (folder / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
