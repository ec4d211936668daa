"""Linear layers for a flat [T, in] batch.

On CPU in bf16 the weight is pre-packed once into oneDNN's blocked layout (what inductor's
freezing does): the eager path re-lays the weight out on every call and streamed ~1.5x slower
here, at every batch size. Optionally a weight-only int8 copy serves the smallest steps (batch-1
decode), which are purely memory-bound: int8 moves half the bytes.

A linear may carry LoRA weights (`lora`, set by the engine's LoRA manager): the step's adapter
term is added on top of whichever base path ran (see app/engine/lora.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_int8_per_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: weight ≈ q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Linear:
    """y = x @ Wᵀ (+ b). `int8_max_tokens` > 0 enables the int8 path for steps of at most that many rows."""

    __slots__ = ("weight", "packed", "bias", "qweight", "qscale", "int8_max_tokens", "out_features", "lora")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, int8_max_tokens: int = 0,
                 pack: bool = False) -> None:
        self.weight: torch.Tensor | None = weight.contiguous()
        self.out_features = weight.shape[0]
        self.bias = bias
        self.int8_max_tokens = int8_max_tokens
        self.qweight: torch.Tensor | None = None
        self.qscale: torch.Tensor | None = None
        if int8_max_tokens > 0:
            q, s = quantize_int8_per_row(weight)
            self.qweight, self.qscale = q, s.to(weight.dtype)
        self.lora = None  # LinearLoRA: this linear's adapter weights (app/engine/lora.py)
        self.packed: torch.Tensor | None = None
        if pack:
            self.packed = pack_for_cpu(self.weight)
            if self.packed is not None:
                self.weight = None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora`: the step's LoRABatch, or None when no row of the step uses an adapter."""
        if self.qweight is not None and x.shape[0] <= self.int8_max_tokens:
            y = torch._weight_int8pack_mm(x, self.qweight, self.qscale)
            if self.bias is not None:
                y = y + self.bias
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if lora is not None and self.lora is not None:
            y = lora.apply(self.lora, x, y)
        return y


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN-blocked copy of a bf16 CPU weight, or None where this torch build cannot make one."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)  # batch hint: any row count works
        probe = torch.ones(2, weight.shape[1], dtype=weight.dtype)
        if not torch.allclose(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "").float(),
                              F.linear(probe, weight).float(), rtol=1e-2, atol=1e-2):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None
