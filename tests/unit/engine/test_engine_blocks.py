"""Block manager: shared prefix blocks are reference counted, freed blocks stay findable until reused, and reuse
drops the stale hash so a later lookup cannot return a block that now holds other tokens."""

from deepfleet.engine.block_manager import BlockManager
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.sequence import Sequence


def _computed(bm: BlockManager, rid: str, tokens: list[int]) -> Sequence:
    """A sequence admitted, with every token computed and its full blocks registered."""
    seq = Sequence(rid, None, tokens, SamplingParams())
    bm.allocate_prefix(seq)
    assert bm.allocate(seq, seq.num_uncomputed)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)
    return seq


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _computed(bm, "a", list(range(9)))  # blocks: [0..3] [4..7] [8]
    b = _computed(bm, "b", list(range(8)) + [50, 51])  # shares the two full blocks
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    assert bm.num_free_blocks == 8 - 4
    bm.free_seq(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    bm.free_seq(b)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_counts)


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _computed(bm, "a", list(range(9)))
    first_two = a.block_table[:2]
    bm.free_seq(a)
    c = Sequence("c", None, list(range(8)) + [99], SamplingParams())
    assert bm.allocate_prefix(c) == (8, 8) and c.block_table == first_two
    bm.free_seq(c)
    # fill the whole pool with other tokens: every cached block is reused and its old hash dropped
    _computed(bm, "d", [200 + i for i in range(16)])
    e = Sequence("e", None, list(range(8)) + [99], SamplingParams())
    assert bm.allocate_prefix(e) == (8, 0) and e.block_table == []


def test_no_prefix_caching_means_no_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _computed(bm, "a", list(range(9)))
    bm.free_seq(a)
    b = Sequence("b", None, list(range(9)), SamplingParams())
    assert bm.allocate_prefix(b) == (0, 0)
