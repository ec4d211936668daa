"""The compiled CPU decode-attention kernel against the PyTorch path it replaces."""

from __future__ import annotations

import pytest
import torch

from app.engine.layers import cpu_kernels
from app.engine.layers.attention import AttentionMetadata, _decode_attention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_kernel_matches_gathered_sdpa(dtype, tol, heads, kv_heads):
    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("no C++ compiler here")
    torch.manual_seed(heads * 10 + kv_heads)
    num_blocks, block, dim, batch = 64, 16, 64, 5
    k_cache = torch.randn(num_blocks, kv_heads, dim, block).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim).to(dtype)
    lens = [1, 17, 33, 100, 64]
    max_blocks = max(-(-n // block) for n in lens)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in lens])
    q = torch.randn(batch, heads, dim).to(dtype)
    ar = torch.arange(max_blocks * block)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=batch,
                             decode_block_tables=tables, decode_context_lens=lens,
                             decode_mask=(ar[None] < torch.tensor(lens)[:, None]).view(batch, 1, 1, -1), prefills=[])
    reference = _decode_attention(q, k_cache, v_cache, meta, kv_heads)
    meta.cpu_kernels = kernels
    meta.decode_context_lens_t = torch.tensor(lens)
    got = _decode_attention(q, k_cache, v_cache, meta, kv_heads)
    assert torch.allclose(got.float(), reference.float(), atol=tol, rtol=tol)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel_matches_the_pytorch_scatter(dtype):
    from app.engine.layers.attention import write_kv

    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("no C++ compiler here")
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(37, 9 + 3 + 3, 64, generator=gen).to(dtype)  # k and v as views of a fused output
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.randperm(8 * 16, generator=gen)[:37]
    caches = [(torch.zeros(8, 3, 64, 16, dtype=dtype), torch.zeros(8, 16, 3, 64, dtype=dtype)) for _ in range(2)]
    write_kv(caches[0][0], caches[0][1], k, v, slots)
    kernels.write_kv_(caches[1][0], caches[1][1], k, v, slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.write_kv_(caches[1][0], caches[1][1], k[:1], v[:1], torch.tensor([8 * 16]))
