"""Block manager: allocation, ref counts, prefix-cache hits and eviction order (no model)."""

from app.engine.block_manager import BlockManager, BlockSequence


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = BlockSequence(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3
    assert bm.usage() == 3 / 8
    bm.free(seq)
    assert bm.usage() == 0.0 and bm.num_free_blocks == 8


def test_cannot_allocate_past_capacity():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = BlockSequence(list(range(12)))
    assert not bm.can_allocate(seq, 12)


def test_prefix_hit_shares_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = BlockSequence(list(range(10)))
    bm.allocate(first, 10)
    first.num_computed_tokens = 10
    bm.commit_computed(first)  # two full blocks published
    second = BlockSequence(list(range(8)) + [99, 98])
    assert bm.match_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert bm.blocks[first.block_table[0]].ref_count == 2
    # An exact repeat of a block-aligned prompt still computes its last token.
    third = BlockSequence(list(range(8)))
    assert bm.match_prefix(third) == 4
    assert bm.prefix_hits == 12


def test_adapter_identity_is_part_of_the_key():
    bm = BlockManager(num_blocks=16, block_size=4)
    base = BlockSequence(list(range(9)), extra_key=None)
    bm.allocate(base, 9)
    base.num_computed_tokens = 9
    bm.commit_computed(base)
    assert bm.match_prefix(BlockSequence(list(range(9)), extra_key=("adapter", 1))) == 0
    assert bm.match_prefix(BlockSequence(list(range(9)), extra_key=None)) == 8


def test_freed_cached_blocks_stay_reusable_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = BlockSequence(list(range(9)))
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.commit_computed(a)
    bm.free(a)
    assert bm.usage() == 0.0
    again = BlockSequence(list(range(9)))
    assert bm.match_prefix(again) == 8
    bm.free(again)
    # Filling the whole cache with other tokens evicts them.
    other = BlockSequence(list(range(100, 116)))
    bm.allocate(other, 16)
    bm.free(other)
    assert bm.match_prefix(BlockSequence(list(range(9)))) == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = BlockSequence(list(range(9)))
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.commit_computed(a)
    assert bm.match_prefix(BlockSequence(list(range(9)))) == 0
