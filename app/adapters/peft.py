"""Reading and validating LoRA adapters in the Hugging Face PEFT layout.

A PEFT adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`. Weights are
read from safetensors only: pickle checkpoints (`adapter_model.bin`, `*.pt`, `*.pth`) are never
opened, let alone unpickled. Everything the engine cannot serve exactly is refused with a
ValueError that says why (the server answers 400 with it): DoRA, trained biases,
`modules_to_save`, ranks above the limit, modules the model lacks, tensors whose shapes do not
fit the base model.

No engine import: the caller describes the base model by its projection shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# The projections LoRA may target, and the block of a decoder layer each lives in.
TARGET_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

# Config keys naming LoRA variants or extras that change what the adapter computes: refused when set.
_UNSUPPORTED_KEYS: dict[str, str] = {
    "use_dora": "DoRA (use_dora) adapters are not supported: merge the magnitude vectors or train a plain LoRA",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 style Conv1D layers) do not fit this model",
    "lora_bias": "adapters with a trained LoRA bias (lora_bias) are not supported",
    "layer_replication": "layer_replication adapters are not supported",
    "trainable_token_indices": "adapters with trainable token embeddings (trainable_token_indices) are not supported",
    "target_parameters": "adapters on raw parameters (target_parameters) are not supported",
    "use_qalora": "QA-LoRA (use_qalora) adapters are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) adapters are not supported",
    "arrow_config": "Arrow routing (arrow_config) adapters are not supported",
    "use_bdlora": "use_bdlora adapters are not supported",
    "kasa_config": "kasa_config adapters are not supported",
    "velora_config": "velora_config adapters are not supported",
    "monteclora_config": "monteclora_config adapters are not supported",
}

# Initialisations that rewrite the base weights: such an adapter needs the rewritten base model.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")

_KEY = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]\w*)\.(?P<module>[A-Za-z_]\w*)"
    r"\.lora_(?P<ab>[AB])(?:\.[A-Za-z_]\w*)?\.weight$"
)


@dataclasses.dataclass
class PeftAdapter:
    """A validated adapter: per (layer, module) the pair (A [r, in], B [out, r]), float32, with the
    scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) already folded into B."""

    path: Path
    rank: int  # the largest rank over its modules
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]  # the short names it adapts, in model order
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    config: dict

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _refuse(path: Path, why: str) -> ValueError:
    return ValueError(f"LoRA adapter {path}: {why}")


def read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise _refuse(path, f"{CONFIG_FILE} is missing: a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _refuse(path, f"{CONFIG_FILE} must hold a JSON object")
    return cfg


def check_config(path: Path, cfg: dict, max_rank: int) -> None:
    """Refuse what the engine cannot serve, from the config alone."""
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise _refuse(path, f"peft_type {peft_type!r} is not LoRA; only LoRA adapters are served")
    for key, why in _UNSUPPORTED_KEYS.items():
        if cfg.get(key):
            raise _refuse(path, why)
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise _refuse(path, f"bias={bias!r}: adapters that train biases are not supported (bias must be \"none\")")
    if cfg.get("modules_to_save"):
        raise _refuse(path, f"modules_to_save={cfg['modules_to_save']!r}: adapters that replace whole modules "
                            "are not supported, only LoRA weights")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _refuse(path, f"init_lora_weights={init!r} rewrites the base weights; save it converted to a plain "
                            "LoRA (save_pretrained(path_initial_model_for_weight_conversion=...))")
    r = cfg.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _refuse(path, f"r={r!r} must be a positive integer")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _refuse(path, f"lora_alpha={alpha!r} must be a number")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(name) or {}
        if not isinstance(pattern, dict):
            raise _refuse(path, f"{name} must be an object of module pattern -> value")
    ranks = [r, *(cfg.get("rank_pattern") or {}).values()]
    if any(not isinstance(v, int) or v < 1 for v in ranks):
        raise _refuse(path, "rank_pattern values must be positive integers")
    if max(ranks) > max_rank:
        raise _refuse(path, f"rank {max(ranks)} exceeds max_lora_rank={max_rank}; raise max_lora_rank or use a "
                            "smaller adapter")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if not isinstance(t, str) or t.split(".")[-1] not in TARGET_MODULES]
        if unknown:
            raise _refuse(path, f"target module(s) {unknown} are not in this model; LoRA can target "
                                f"{', '.join(TARGET_MODULES)}")
    elif targets is not None and not isinstance(targets, str):
        raise _refuse(path, "target_modules must be a list of module names or a regular expression")


def _pattern_value(pattern: Mapping, module_path: str, default):
    """PEFT's rule: the first pattern key that matches the end of the module's path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def read_peft_adapter(
    path: str | Path,
    module_shapes: Mapping[str, tuple[int, int]],
    num_layers: int,
    max_rank: int,
) -> PeftAdapter:
    """Read and validate the adapter at `path` for a model whose projection `name` maps `in -> out`
    features (`module_shapes[name] == (in, out)`) in each of `num_layers` layers.

    Raises FileNotFoundError when `path` does not exist, ValueError saying why otherwise.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"LoRA adapter path {path} does not exist")
    if not path.is_dir():
        raise _refuse(path, f"not a folder: a PEFT adapter is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _refuse(path, f"only pickle weights ({', '.join(pickles)}); pickle files are never loaded: convert "
                                f"the adapter to {WEIGHTS_FILE}")
        raise _refuse(path, f"{WEIGHTS_FILE} is missing")
    cfg = read_config(path)
    check_config(path, cfg, max_rank)

    from safetensors import SafetensorError, safe_open

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_file, framework="pt") as handle:
            for key in handle.keys():
                m = _KEY.match(key)
                if m is None:
                    if "lora_magnitude_vector" in key:
                        raise _refuse(path, "DoRA magnitude vectors found: DoRA adapters are not supported")
                    if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                        raise _refuse(path, f"tensor {key} adapts the embeddings or the LM head; LoRA can target "
                                            f"{', '.join(TARGET_MODULES)} only")
                    if key.endswith(".bias"):
                        raise _refuse(path, f"tensor {key} is a trained bias; adapters with biases are not supported")
                    raise _refuse(path, f"tensor {key} is not a LoRA weight of a decoder projection")
                layer, module = int(m["layer"]), m["module"]
                if module not in TARGET_MODULES or module not in module_shapes:
                    raise _refuse(path, f"target module {module!r} (tensor {key}) is not in this model; LoRA can "
                                        f"target {', '.join(TARGET_MODULES)}")
                if m["block"] != TARGET_MODULES[module]:
                    raise _refuse(path, f"tensor {key}: {module} belongs to {TARGET_MODULES[module]}, not {m['block']}")
                if layer >= num_layers:
                    raise _refuse(path, f"tensor {key} is for layer {layer}, but the model has {num_layers} layers")
                slot = pairs.setdefault((layer, module), {})
                if m["ab"] in slot:
                    raise _refuse(path, f"tensor {key} appears twice (several adapters in one file?)")
                slot[m["ab"]] = handle.get_tensor(key)
    except SafetensorError as exc:
        raise _refuse(path, f"{WEIGHTS_FILE} is not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise _refuse(path, f"{WEIGHTS_FILE} cannot be read ({exc})") from None
    if not pairs:
        raise _refuse(path, f"{WEIGHTS_FILE} holds no LoRA weights")

    r_default = cfg.get("r", 8)
    alpha_default = float(cfg.get("lora_alpha", 8))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    max_seen = 0
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if "A" not in ab or "B" not in ab:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise _refuse(path, f"{where} has lora_{have} without lora_{lack}")
        a, b = ab["A"], ab["B"]
        in_f, out_f = module_shapes[module]
        if a.dim() != 2 or b.dim() != 2:
            raise _refuse(path, f"{where}: LoRA weights must be matrices, got A {tuple(a.shape)} and B {tuple(b.shape)}")
        rank = a.shape[0]
        if a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != rank:
            raise _refuse(path, f"{where}: shapes A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the base "
                                f"model (expected A [r, {in_f}] and B [{out_f}, r]); was it trained for another model?")
        if not a.is_floating_point() or not b.is_floating_point():
            raise _refuse(path, f"{where}: LoRA weights must be floating point, got {a.dtype} and {b.dtype}")
        if rank > max_rank:
            raise _refuse(path, f"{where} has rank {rank}, above max_lora_rank={max_rank}; raise max_lora_rank or "
                                "use a smaller adapter")
        module_path = f"model.layers.{layer}.{TARGET_MODULES[module]}.{module}"
        r_cfg = _pattern_value(rank_pattern, module_path, r_default)
        if r_cfg != rank:
            raise _refuse(path, f"{where}: the tensors have rank {rank} but the config says r={r_cfg}")
        alpha = float(_pattern_value(alpha_pattern, module_path, alpha_default))
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise _refuse(path, f"{where}: LoRA weights hold NaN or infinite values")
        weights[(layer, module)] = (a32.contiguous(), (b32 * scaling).contiguous())
        max_seen = max(max_seen, rank)
    present = {module for _, module in weights}
    targets = [m for m in TARGET_MODULES if m in present]
    return PeftAdapter(path, max_seen, alpha_default, use_rslora, targets, weights, cfg)
