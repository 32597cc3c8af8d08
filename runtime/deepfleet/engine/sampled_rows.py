"""The sequences a step samples, in row order, kept from one step to the next while the same sequences are sampled
in the same order (the decode steady state, detected by one identity comparison of the lists).

Built once for such a run of steps: each sequence's row of the sampled-token tensor (Sequence.pending_row, the
same every step), its sampling state and token list, and the index of its last token. A step's placeholders are
then one append to every token list (map: no Python frame per sequence) and one comparison of the new lengths
with the last indices, instead of a method call per sequence."""

from __future__ import annotations

from collections import deque
from itertools import repeat

import numpy as np

from deepfleet.engine.sequence import PLACEHOLDER, Sequence


class SampledRows:
    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.states = [seq.sampling for seq in seqs]
        self._tokens = [seq.token_ids for seq in seqs]  # (a sequence keeps its list for its whole life)
        self._last_index = np.array([seq.last_index for seq in seqs], np.int64)
        for row, seq in enumerate(seqs):
            seq.pending_row = row

    def add_placeholders(self) -> list[int]:
        """A placeholder token (sampled into its row, still on the device) at the end of every row's sequence;
        returns their indices in token_ids."""
        tokens = self._tokens
        deque(map(list.append, tokens, repeat(PLACEHOLDER)), maxlen=0)
        index = np.fromiter(map(len, tokens), np.int64, len(tokens)) - 1
        # its last token by length is in flight: nothing to schedule (a flag that never goes back)
        for row in np.flatnonzero(index >= self._last_index).tolist():
            self.seqs[row].final_pending = True
        return index.tolist()
