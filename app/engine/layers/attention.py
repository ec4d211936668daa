"""Attention over the paged KV cache, for a flat batch whose decode rows come first.

Cache layout per layer: K is [num_blocks, KVH, D, block] (transposed within a block, so the CPU
kernel computes q·k for a whole block with 16-wide vector FMAs), V is [num_blocks, block, KVH, D].

The step's new K/V are written into their cache slots first, then:
* decode rows (one query token each) attend together: their blocks are gathered into a padded
  [B, KVH, L, D] view and one masked `scaled_dot_product_attention` serves the whole group, with
  the query heads of a KV head folded into the query-length axis (GQA without repeating K/V);
* prefill rows (a chunk of a prompt) attend per sequence: causal over the chunk itself when no
  earlier tokens are cached, else a mask offset by the tokens already computed.
With the compiled CPU kernel (bf16/fp16 on CPU) all rows go through it in one call instead: a
prefill row is a query that sees the first position + 1 cached tokens. torch's CPU flash
attention took ~0.9 ms for one 200-token SmolLM2 prompt per layer; the kernel does the same rows
several times faster and saves the per-sequence calls.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class PrefillSlice:
    start: int  # row range of this sequence's query tokens in the flat batch
    end: int
    context_len: int  # tokens of this sequence in the cache after this step
    block_table: torch.Tensor  # [num_blocks] long
    mask: torch.Tensor | None  # [q, context_len] bool when part of the context was computed earlier


@dataclasses.dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    num_decode: int  # rows [0, num_decode) are decode rows
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] long
    decode_context_lens: list[int]
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool; None when B == 1
    prefills: list[PrefillSlice]
    decode_context_lens_t: torch.Tensor | None = None  # [B] long, for the CPU kernel
    cpu_kernels: object | None = None  # the compiled CPU kernel module, when in use
    # With the CPU kernel, every row of the step (decode and prefill) in one call: each row's
    # sequence block table and its context length (position + 1, so prefill rows are causal).
    row_block_tables: torch.Tensor | None = None  # [T, max_blocks] long
    row_context_lens: torch.Tensor | None = None  # [T] long


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k/v are [T, KVH, D], written at their slots (K transposed within its block)."""
    kvh, d = v.shape[1], v.shape[2]
    block = v_cache.shape[1]
    k_cache[slots // block, :, :, slots % block] = k
    v_cache.view(-1, kvh, d).index_copy_(0, slots, v)


def k_by_token(k_blocks: torch.Tensor) -> torch.Tensor:
    """[..., KVH, D, block] K blocks viewed as [..., block, KVH, D], like V."""
    return k_blocks.movedim(-1, -3)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    if meta.cpu_kernels is not None:
        meta.cpu_kernels.write_kv_(k_cache, v_cache, k, v, meta.slot_mapping)
    else:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    b = meta.num_decode
    if meta.row_block_tables is not None:  # the CPU kernel: all rows at once, read in place
        return meta.cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.row_block_tables, meta.row_context_lens, head_dim**-0.5
        )
    if b and not meta.prefills:  # all decode: no scatter into a separate output
        return _decode_attention(q, k_cache, v_cache, meta, kv_heads)
    out = torch.empty_like(q)

    if b:
        out[:b] = _decode_attention(q[:b], k_cache, v_cache, meta, kv_heads)

    for p in meta.prefills:
        qp = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        if p.mask is None:  # the whole context is this step's tokens
            kp, vp = k[p.start : p.end], v[p.start : p.end]
        else:
            kp = k_by_token(k_cache[p.block_table]).flatten(0, 1)[: p.context_len]
            vp = v_cache[p.block_table].flatten(0, 1)[: p.context_len]
        kp = kp.transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        vp = vp.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=group > 1)
        out[p.start : p.end] = o[0].transpose(0, 1)
    return out


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, kv_heads: int) -> torch.Tensor:
    """q [B, H, D] of one token per sequence → [B, H, D]."""
    b, num_heads, head_dim = q.shape
    if meta.cpu_kernels is not None:  # reads the blocks in place: no gathered copy
        return meta.cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens_t, head_dim**-0.5
        )
    qd = q.view(b, kv_heads, num_heads // kv_heads, head_dim)  # query heads of a KV head as rows
    tables = meta.decode_block_tables
    keys = k_by_token(k_cache[tables]).flatten(1, 2)  # [B, L, KVH, D]
    values = v_cache[tables].flatten(1, 2)
    if b == 1:  # no padding: trim to the context
        n = meta.decode_context_lens[0]
        keys, values = keys[:, :n], values[:, :n]
    o = F.scaled_dot_product_attention(qd, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.decode_mask)
    return o.reshape(b, num_heads, head_dim)
