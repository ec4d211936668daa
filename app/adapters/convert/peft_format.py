"""Hugging Face PEFT: `adapter_config.json` + `adapter_model.safetensors`.

Validation is app.adapters.peft's (same refusals as the server: DoRA, biases, modules_to_save,
pickles never opened); unlike the serving reader, tensors are kept as stored (dtype and bits,
scale not folded in), because a conversion must be able to give them back unchanged.
Key layout (peft's `save_pretrained`): `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`,
A [r, in], B [out, r]; scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from app.adapters import peft as peft_io
from app.adapters.convert.adapter import MAX_RANK, Adapter, LoraModule, build_peft_config, check_tensor_pair, module_path
from app.jobs.context import JobError

_KEY_TEMPLATE = "base_model.model.model.layers.{layer}.{block}.{module}.lora_{ab}.weight"


def read_peft(path: Path, tick: Callable[[], None]) -> Adapter:
    if not path.is_dir():
        raise JobError(f"{path} is not a folder: a PEFT adapter is a folder with {peft_io.CONFIG_FILE} and "
                       f"{peft_io.WEIGHTS_FILE}")
    weights_file = path / peft_io.WEIGHTS_FILE
    if not weights_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in peft_io.PICKLE_SUFFIXES)
        if pickles:
            raise JobError(f"{path} holds only pickle weights ({', '.join(pickles)}); pickle files are never "
                           f"loaded: save the adapter as {peft_io.WEIGHTS_FILE} (save_pretrained(..., "
                           "safe_serialization=True)) and convert that")
        raise JobError(f"{path}: {peft_io.WEIGHTS_FILE} is missing; a PEFT adapter needs {peft_io.CONFIG_FILE} and "
                       f"{peft_io.WEIGHTS_FILE}")
    try:
        cfg = peft_io.read_config(path)
        peft_io.check_config(path, cfg, MAX_RANK)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    pairs = _read_tensors(path, weights_file, tick)

    r_default, alpha_default = cfg.get("r", 8), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"{path}: layer {layer} {module}"
        if "A" not in ab or "B" not in ab:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise JobError(f"{where} has lora_{have} without lora_{lack}")
        check_tensor_pair(where, ab["A"], ab["B"])
        mpath = module_path(layer, module)
        r_cfg = peft_io._pattern_value(rank_pattern, mpath, r_default)
        if r_cfg != ab["A"].shape[0]:
            raise JobError(f"{where}: the tensors have rank {ab['A'].shape[0]} but the config says r={r_cfg}")
        alpha = float(peft_io._pattern_value(alpha_pattern, mpath, alpha_default))
        modules[(layer, module)] = LoraModule(ab["A"], ab["B"], alpha)
    return Adapter(modules, use_rslora=bool(cfg.get("use_rslora", False)), peft_config=cfg,
                   base_model=cfg.get("base_model_name_or_path"))


def _read_tensors(path: Path, weights_file: Path, tick: Callable[[], None]) -> dict[tuple[int, str], dict]:
    from safetensors import SafetensorError, safe_open

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_file, framework="pt") as handle:
            for key in handle.keys():
                tick()
                m = peft_io._KEY.match(key)
                if m is None:
                    if "lora_magnitude_vector" in key:
                        raise JobError(f"{path}: DoRA magnitude vectors found ({key}); DoRA adapters cannot be "
                                       "converted: train a plain LoRA or merge the magnitudes first")
                    raise JobError(f"{path}: tensor {key} is not a LoRA weight of a decoder projection "
                                   f"({', '.join(peft_io.TARGET_MODULES)}); only those convert")
                layer, module = int(m["layer"]), m["module"]
                if module not in peft_io.TARGET_MODULES or m["block"] != peft_io.TARGET_MODULES[module]:
                    raise JobError(f"{path}: tensor {key} targets {m['block']}.{module}; LoRA conversion covers "
                                   f"{', '.join(peft_io.TARGET_MODULES)} in self_attn/mlp")
                slot = pairs.setdefault((layer, module), {})
                if m["ab"] in slot:
                    raise JobError(f"{path}: tensor {key} appears twice (several adapters in one file?)")
                slot[m["ab"]] = handle.get_tensor(key)
    except SafetensorError as exc:
        raise JobError(f"{weights_file} is not a valid safetensors file ({exc}); re-save the adapter") from None
    except OSError as exc:
        raise JobError(f"{weights_file} cannot be read ({exc})") from None
    if not pairs:
        raise JobError(f"{weights_file} holds no LoRA weights")
    return pairs


def write_peft(adapter: Adapter, folder: Path, tick: Callable[[], None]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), weights in adapter.sorted_items():
        tick()
        block = peft_io.TARGET_MODULES[module]
        # clone(): safetensors refuses tensors that share storage (a fused A read from NeMo is shared).
        tensors[_KEY_TEMPLATE.format(layer=layer, block=block, module=module, ab="A")] = weights.a.contiguous().clone()
        tensors[_KEY_TEMPLATE.format(layer=layer, block=block, module=module, ab="B")] = weights.b.contiguous().clone()
    save_file(tensors, folder / peft_io.WEIGHTS_FILE, metadata={"format": "pt"})
    config = build_peft_config(adapter)
    (folder / peft_io.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
