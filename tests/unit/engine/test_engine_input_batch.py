"""Persistent block-table rows (engine/input_batch.py): rows added with the whole table, updated only by the
reported changes (a block appended, a table freed and rebuilt), freed rows reused, the matrix grown, the rows of
an unchanged step reused; and, driven by the scheduler's reported changes through random preemptions, every
scheduled sequence's row equal to its table."""

import random

from deepfleet.engine.block_manager import BlockManager
from deepfleet.engine.input_batch import InputBatch
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.scheduler import Scheduler
from deepfleet.engine.sequence import Sequence


def _seq(rid: str, table: list[int]) -> Sequence:
    seq = Sequence(rid, None, [1, 2, 3], SamplingParams())
    seq.block_table = table
    return seq


def test_new_rows_copy_the_whole_table_lowest_row_first():
    batch = InputBatch(width=4)
    a, b = _seq("a", [7, 8]), _seq("b", [3])
    assert batch.rows([a, b]).tolist() == [0, 1]
    assert batch.tables[0, :2].tolist() == [7, 8] and batch.tables[1, :1].tolist() == [3]
    assert batch.num_blocks[:2].tolist() == [2, 1]


def test_an_appended_block_reaches_the_row_only_through_apply():
    batch = InputBatch(width=4)
    a = _seq("a", [7, 8])
    batch.rows([a])
    a.block_table.append(9)
    batch.rows([a])
    assert batch.num_blocks[0] == 2  # not reported yet: the row is as it was
    batch.apply([a])
    assert batch.tables[0, :3].tolist() == [7, 8, 9] and batch.num_blocks[0] == 3


def test_a_freed_and_rebuilt_table_is_copied_anew():
    batch = InputBatch(width=4)
    a = _seq("a", [7, 8, 9])
    batch.rows([a])
    a.block_table = [1, 2, 3]  # preempted and readmitted: a new list, as long as the old one
    batch.apply([a])
    assert batch.tables[0, :3].tolist() == [1, 2, 3]
    a.block_table = []
    batch.apply([a])
    assert batch.num_blocks[0] == 0


def test_an_unchanged_step_reuses_its_rows_and_a_changed_one_does_not():
    batch = InputBatch(width=4)
    a, b = _seq("a", [1]), _seq("b", [2])
    first = batch.rows([a, b])
    assert batch.rows([a, b]) is first
    assert batch.rows([b, a]).tolist() == [1, 0]


def test_a_removed_row_goes_to_the_next_request_and_ended_ones_are_skipped():
    batch = InputBatch(width=4)
    a, b = _seq("a", [1, 2]), _seq("b", [3])
    batch.rows([a, b])
    batch.remove("a")
    batch.apply([a])  # an ended request's freed table: no row to update
    assert "a" not in batch.row_of
    c = _seq("c", [5])
    assert batch.rows([b, c]).tolist() == [1, 0]
    assert batch.tables[0, :1].tolist() == [5] and batch.num_blocks[0] == 1


def test_the_matrix_doubles_when_rows_run_out_and_keeps_the_rows():
    batch = InputBatch(width=2, rows=2)
    seqs = [_seq(f"r{i}", [10 + i, 20 + i]) for i in range(3)]
    assert batch.rows(seqs).tolist() == [0, 1, 2]
    assert batch.tables.shape == (4, 2)
    assert batch.tables[:3].tolist() == [[10, 20], [11, 21], [12, 22]]


def test_block_manager_reports_each_changed_table_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = Sequence("a", None, [1] * 5, SamplingParams()), Sequence("b", None, [2] * 3, SamplingParams())
    assert bm.allocate(a, 5) and bm.allocate(b, 3)
    assert bm.allocate(a, 1)  # room in its second block: no change
    bm.allocate(a, 4)  # a third block
    assert bm.take_changed() == [a, b]
    assert bm.take_changed() == []
    bm.free_seq(b)
    assert bm.take_changed() == [b]


def test_rows_follow_the_tables_through_random_preemptions():
    rng = random.Random(5)
    bm = BlockManager(num_blocks=24, block_size=4)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=40)
    batch = InputBatch(width=16, rows=2)
    for i in range(30):
        sched.add(Sequence(f"r{i}", None, [rng.randrange(50) for _ in range(rng.randrange(1, 14))],
                           SamplingParams(max_tokens=rng.randrange(1, 20))))
    steps = 0
    while sched.has_unfinished():
        steps += 1
        out = sched.schedule()
        seqs = [s for s, _ in out.scheduled]
        assert out.num_decodes == sum(n == 1 for _, n in out.scheduled)
        batch.apply(out.table_changes)
        rows = batch.rows(seqs)
        for seq, row in zip(seqs, rows.tolist(), strict=True):
            assert batch.tables[row, : len(seq.block_table)].tolist() == seq.block_table
            assert batch.num_blocks[row] == len(seq.block_table)
        sched.update_after_step(out)
        for seq in seqs:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(7)
                if seq.num_tokens > seq.last_index:
                    sched.remove(seq)
                    batch.remove(seq.request_id)
    assert sched.num_preemptions > 0 and steps > 10
    assert not batch.row_of
