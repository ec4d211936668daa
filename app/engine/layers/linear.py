"""Linear layers for a flat [T, in] batch, with an optional weight-only int8 copy for small steps.

At decode the CPU is memory-bound: reading int8 weights moves half the bytes of bf16 and its
kernel streams far faster than eager bf16 at one row. Larger steps (prefill, big batches) are
compute-bound and run the dense weight on the matrix units, so both copies are kept.
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

    __slots__ = ("weight", "bias", "qweight", "qscale", "int8_max_tokens")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, int8_max_tokens: int = 0) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        self.int8_max_tokens = int8_max_tokens
        self.qweight: torch.Tensor | None = None
        self.qscale: torch.Tensor | None = None
        if int8_max_tokens > 0:
            q, s = quantize_int8_per_row(weight)
            self.qweight, self.qscale = q, s.to(weight.dtype)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None and x.shape[0] <= self.int8_max_tokens:
            y = torch._weight_int8pack_mm(x, self.qweight, self.qscale)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
