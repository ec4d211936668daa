"""The CPU multi-LoRA decode kernel against the same products in float32 PyTorch."""

from __future__ import annotations

import pytest
import torch

from app.engine.layers import cpu_kernels


def reference(y, x, a, bt, slots, cols, rows):
    out = y.float().clone()
    for r in range(rows):
        c0, c1 = cols[slots[r]].tolist()
        if c1 > c0:
            out[r] += (x[r].float() @ a[c0:c1].float().t()) @ bt[c0:c1].float()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,out_f", [(576, 960), (1536, 576), (100, 37)])
def test_lora_decode_matches_float32_products(dtype, in_f, out_f):
    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("no C++ compiler here")
    gen = torch.Generator().manual_seed(in_f + out_f)
    ranks = {1: 16, 2: 48, 3: 0, 4: 8}  # slot 3 has no weights on this linear
    cols, c = [[0, 0]], 0
    for s in range(1, 5):
        cols.append([c, c + ranks[s]])
        c += ranks[s]
    cols_t = torch.tensor(cols)
    a = (torch.randn(c, in_f, generator=gen) / in_f**0.5).to(dtype)
    bt = (torch.randn(c, out_f, generator=gen) * 0.1).to(dtype)
    # decode rows sorted by slot (base rows first), then prefill rows the kernel must not touch
    slots = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 2, 3, 3, 4])
    rows = len(slots)
    x = torch.randn(rows + 5, in_f, generator=gen).to(dtype)
    y = torch.randn(rows + 5, out_f, generator=gen).to(dtype)
    expected = reference(y, x, a, bt, slots, cols_t, rows)
    before = y.clone()
    from app.engine.lora import _nonzero_output_ranges

    # block-diagonal like a fused qkv: slot 2's 48 columns in three groups over three output ranges
    third = out_f // 3
    for g in range(3):
        block = bt[cols[2][0] + 16 * g: cols[2][0] + 16 * (g + 1)]
        block[:, : g * third] = 0
        block[:, (g + 1) * third:] = 0
    expected = reference(y, x, a, bt, slots, cols_t, rows)
    col_out = _nonzero_output_ranges(bt.t())
    assert col_out[cols[2][0] + 16, 0] == third or out_f < 48
    kernels.lora_decode_(y, x, a, bt, slots, cols_t, col_out, rows)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y[:rows].float(), expected[:rows], atol=tol, rtol=tol)
    assert torch.equal(y[:2], before[:2])  # base rows
    assert torch.equal(y[9:11], before[9:11])  # a slot without weights here
    assert torch.equal(y[rows:], before[rows:])  # rows past `rows`
