"""RMSNorm computed in float32 as the reference implementation does, whatever the activation dtype."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    if dtype != torch.float32:
        # One fused kernel (fp32 accumulation inside) instead of six ops: per-op overhead is a
        # large share of a decode step. float32 keeps the reference's exact op order.
        return torch.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)
