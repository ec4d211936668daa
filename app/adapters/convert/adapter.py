"""The format-neutral LoRA adapter every reader produces and every writer consumes.

Weights stay exactly as the source stored them (dtype and bits): A is [r, in], B is [out, r], B is
*not* multiplied by the scale. The scale each module's product is multiplied by is kept as PEFT
states it (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA), computed the way `app.adapters.peft`
computes it, so "same scale" means the same float the engine multiplies by.

A writer that must change the layout (NeMo fuses q/k/v, TensorRT-LLM folds the scale into B) also
writes a sidecar, `mxext_adapter.json`, with the original PEFT config and where each module's
rank components went. The target tools ignore the file; our readers use it, after checking it
against the weights, to give back the original adapter bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import torch

from app.adapters.peft import TARGET_MODULES
from app.jobs.context import JobError

SIDECAR_FILE = "mxext_adapter.json"
SIDECAR_VERSION = 1
MAX_RANK = 1 << 16  # conversion is not bound by the server's max_lora_rank; this only stops nonsense
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """What a fused or flattened format needs to know about the base model's projections."""

    hidden_size: int
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None

    @property
    def q_size(self) -> int | None:
        return self.num_heads * self.head_dim if self.num_heads and self.head_dim else None

    @property
    def kv_size(self) -> int | None:
        return self.num_kv_heads * self.head_dim if self.num_kv_heads and self.head_dim else None

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features per projection, for the ones this layout determines."""
        shapes: dict[str, tuple[int, int]] = {}
        h, q, kv, ffn = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        if q:
            shapes["q_proj"] = (h, q)
            shapes["o_proj"] = (q, h)
        if kv:
            shapes["k_proj"] = shapes["v_proj"] = (h, kv)
        if ffn:
            shapes["gate_proj"] = shapes["up_proj"] = (h, ffn)
            shapes["down_proj"] = (ffn, h)
        return shapes

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelLayout:
        """From a Hugging Face config.json (Llama family)."""
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]) if cfg.get("intermediate_size") else None,
            num_layers=int(cfg["num_hidden_layers"]) if cfg.get("num_hidden_layers") else None,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LoraModule:
    a: torch.Tensor  # [r, in], as stored
    b: torch.Tensor  # [out, r], as stored: the scale is not folded in
    alpha: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass
class Adapter:
    modules: dict[tuple[int, str], LoraModule]  # (layer, "q_proj") -> weights
    use_rslora: bool = False
    peft_config: dict | None = None  # the PEFT config that states these modules exactly, when known
    base_model: str | None = None
    layout: ModelLayout | None = None

    def scale(self, key: tuple[int, str]) -> float:
        return module_scale(self.modules[key].alpha, self.modules[key].rank, self.use_rslora)

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        present = {module for _, module in self.modules}
        return [m for m in TARGET_MODULES if m in present]

    @property
    def dtype(self) -> torch.dtype:
        return self.modules[min(self.modules)].a.dtype

    def sorted_items(self) -> list[tuple[tuple[int, str], LoraModule]]:
        order = list(TARGET_MODULES)
        return sorted(self.modules.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1])))


def module_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The float the engine multiplies B by (app.adapters.peft does the same arithmetic)."""
    alpha = float(alpha)
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def scale_b(b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """B times its scale, the product computed in float32 as the engine does, stored as `dtype`."""
    return (b.to(torch.float32) * scale).to(dtype)


def module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{TARGET_MODULES[module]}.{module}"


def build_peft_config(adapter: Adapter) -> dict:
    """The adapter_config.json that states `adapter` exactly: the commonest (rank, alpha) as r and
    lora_alpha, every other module through rank_pattern / alpha_pattern under its full path."""
    if adapter.peft_config is not None:
        return dict(adapter.peft_config)
    pairs = collections.Counter((m.rank, float(m.alpha)) for m in adapter.modules.values())
    (r, alpha), _ = pairs.most_common(1)[0]
    rank_pattern, alpha_pattern = {}, {}
    for (layer, module), weights in adapter.sorted_items():
        if weights.rank != r:
            rank_pattern[module_path(layer, module)] = weights.rank
        if float(weights.alpha) != alpha:
            alpha_pattern[module_path(layer, module)] = _plain_number(weights.alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": _plain_number(alpha),
        "use_rslora": adapter.use_rslora,
        "target_modules": adapter.target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


def _plain_number(value: float) -> int | float:
    """16.0 -> 16: configs read as people write them; int(x) == x, so nothing changes."""
    return int(value) if float(value).is_integer() else float(value)


def parse_sidecar(raw: bytes | None) -> dict | None:
    """The sidecar's content, or None when it is absent or not ours (then it is simply not used)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION:
        return None
    return data


def check_tensor_pair(where: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise JobError(f"{where}: LoRA weights must be matrices, got A {tuple(a.shape)} and B {tuple(b.shape)}")
    if b.shape[1] != a.shape[0]:
        raise JobError(f"{where}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree on the rank")
    if not a.is_floating_point() or not b.is_floating_point():
        raise JobError(f"{where}: LoRA weights must be floating point, got {a.dtype} and {b.dtype}")
    if not 1 <= a.shape[0] <= MAX_RANK:
        raise JobError(f"{where}: rank {a.shape[0]} is out of range")


def peft_module_params(cfg: dict, layer: int, module: str) -> tuple[int, float]:
    """(rank, alpha) the PEFT config `cfg` gives one module, by PEFT's pattern rule."""
    from app.adapters.peft import _pattern_value

    mpath = module_path(layer, module)
    rank = _pattern_value(cfg.get("rank_pattern") or {}, mpath, cfg.get("r", 8))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, mpath, cfg.get("lora_alpha", 8)))
    return rank, alpha


def usable_peft_config(cfg: object) -> dict | None:
    """A sidecar's PEFT config if the server would accept it, else None (the sidecar is then ignored)."""
    from app.adapters.peft import check_config

    if not isinstance(cfg, dict):
        return None
    try:
        check_config(Path("sidecar"), cfg, MAX_RANK)
    except ValueError:
        return None
    return cfg
