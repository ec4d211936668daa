"""Paged KV-cache blocks with prefix caching. Pure Python: no torch, testable without a model.

A block holds `block_size` tokens of K/V for every layer. A sequence owns a block table (block
ids in order). A *full* block is identified by a hash chain over its tokens, the hash of the block
before it, and an `extra_key` (the adapter identity and version), so two requests with the same
prefix and the same adapter share blocks, and a reloaded adapter never reuses stale ones.

Freed blocks that carry a hash stay in the cache (ref count 0) until allocation evicts them, least
recently freed first; `usage()` counts only blocks some sequence holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None


class BlockSequence:
    """What the block manager needs to know of a sequence (the scheduler's Sequence extends it)."""

    def __init__(self, token_ids: list[int], extra_key: Hashable = None) -> None:
        self.token_ids = token_ids
        self.extra_key = extra_key
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the leading full blocks, in order
        self.num_computed_tokens = 0


def block_hash(parent: int | None, tokens: Sequence[int], extra_key: Hashable) -> int:
    return hash((parent, tuple(tokens), extra_key))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (oldest first). Values unused: an ordered set.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: BlockSequence, num_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_tokens` tokens in all."""
        needed = -(-num_tokens // self.block_size)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: BlockSequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    # ---- prefix caching -------------------------------------------------------------------
    def match_prefix(self, seq: BlockSequence) -> int:
        """Attach the cached blocks that start `seq` and return how many tokens they cover.

        Only for a sequence that holds no blocks yet. At least one token is always left to
        compute, since the model must run on the last token to produce logits.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        self.prefix_queries += len(seq.token_ids)
        hit = 0
        for h in seq.block_hashes[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            hit += 1
        num_tokens = hit * self.block_size
        self.prefix_hits += num_tokens
        seq.num_computed_tokens = num_tokens
        return num_tokens

    def _extend_hashes(self, seq: BlockSequence, num_full_blocks: int) -> None:
        bs = self.block_size
        while len(seq.block_hashes) < num_full_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.extra_key))

    def commit_computed(self, seq: BlockSequence) -> None:
        """Publish the blocks that `seq.num_computed_tokens` has filled, for later requests to reuse."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._extend_hashes(seq, num_full)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                h = seq.block_hashes[i]
                block.hash = h
                self._cached.setdefault(h, block.block_id)

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, seq: BlockSequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens. Call can_allocate first."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its cached contents
                if self._cached.get(block.hash) == block_id:
                    del self._cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def free(self, seq: BlockSequence) -> None:
        """Give back every block of `seq`; the tail goes first so it is evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def reset_prefix_cache(self) -> None:
        for block_id in self._free:
            self.blocks[block_id].hash = None
        self._cached = {h: b for h, b in self._cached.items() if self.blocks[b].ref_count > 0}
