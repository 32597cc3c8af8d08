"""The requests' block tables as persistent rows (in the spirit of vLLM V1's InputBatch), updated by delta.

Each request that ran holds a row of one host matrix until it ends. The block manager reports which sequences'
tables changed (BlockManager.take_changed, passed on as SchedulerOutput.table_changes): a block appended at a
block boundary (once every block_size decode steps), a cached prefix attached at admission, blocks freed by a
preemption. A step copies only those rows' new entries, then gathers its sequences' rows by index; the row
numbers of the last step's sequences are kept and reused while a step schedules the same sequences in the same
order (the decode steady state), so such a step does no work per sequence here.

Rows are not condensed when requests end: vLLM keeps its rows dense because they are the model's input rows in
order; here a step gathers its rows by index, so a hole costs nothing and the next request takes the freed row.
Entries past a table's length hold older valid block ids (the kernels read only a sequence's own blocks)."""

from __future__ import annotations

import numpy as np


class InputBatch:
    def __init__(self, width: int, rows: int = 64):
        self.tables = np.zeros((rows, width), np.int32)
        self.num_blocks = np.zeros(rows, np.int64)  # entries of each row copied (its table's length then)
        self.row_of: dict[str, int] = {}  # request id -> its row
        self._free = list(range(rows - 1, -1, -1))  # lowest first
        self._source: list[list[int] | None] = [None] * rows  # the block-table list each row mirrors
        self._last_seqs: list = []  # the last rows() call's sequences, and their rows
        self._last_rows = np.zeros(0, np.int64)

    def apply(self, changed) -> None:
        """The delta: bring the rows of sequences whose tables changed up to date (ended ones hold no row)."""
        row_of = self.row_of
        for seq in changed:
            row = row_of.get(seq.request_id)
            if row is not None:
                self._sync(row, seq)

    def rows(self, seqs: list) -> np.ndarray:
        """The sequences' rows (a row added, with its whole table, for a sequence seen first)."""
        if seqs == self._last_seqs:  # (identity comparisons: sequences compare as objects)
            return self._last_rows
        row_of = self.row_of
        rows = [row_of.get(seq.request_id) for seq in seqs]
        for i, row in enumerate(rows):
            if row is None:
                rows[i] = self._add(seqs[i])
        self._last_seqs, self._last_rows = seqs, np.array(rows, np.int64)
        return self._last_rows

    def remove(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self._source[row] = None
            self._free.append(row)
            self._last_seqs = []  # its row may go to another request

    def _sync(self, row: int, seq) -> None:
        table, done = seq.block_table, int(self.num_blocks[row])
        n = len(table)
        if table is not self._source[row] or n < done:  # freed (the block manager starts a new list): copy anew
            self._source[row], done = table, 0
        if n > done:
            self.tables[row, done:n] = table[done:n]
        self.num_blocks[row] = n

    def _add(self, seq) -> int:
        if not self._free:  # more requests with rows than rows (preempted ones keep theirs): twice the rows
            n = len(self._source)
            self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self._source += [None] * n
            self._free = list(range(2 * n - 1, n - 1, -1))
        row = self.row_of[seq.request_id] = self._free.pop()
        self._source[row] = None
        self.num_blocks[row] = 0
        self._sync(row, seq)
        return row
