"""The sequences a step samples, in row order, kept from one step to the next while the same sequences are sampled
in the same order (the decode steady state, detected by one identity comparison of the lists).

Built once for such a run of steps: each sequence's row of the sampled-token tensor (Sequence.pending_row, the
same every step), its sampling state, token and output lists, the index of its last token, its end tokens and
whether its text is built per token. A step's placeholders are then one append to every token list (map: no
Python frame per sequence) and one comparison of the new lengths with the last indices; its take-in is one
write per token list, one append per output list and a vectorized search for the rows that need per-token work
(text, an end token, the last token), instead of a pass of Python per sequence for each."""

from __future__ import annotations

from collections import deque
from itertools import repeat

import numpy as np

from deepfleet.engine.sequence import PLACEHOLDER, Sequence


class SampledRows:
    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.states = [seq.sampling for seq in seqs]
        self._tokens = [seq.token_ids for seq in seqs]  # (a sequence keeps its lists for its whole life)
        self._outputs = [seq.sampling.output_token_ids for seq in seqs]
        self._last_index = np.array([seq.last_index for seq in seqs], np.int64)
        self._per_token = np.array([seq.text_per_token for seq in seqs], bool)
        self.all_per_token = bool(self._per_token.all())  # (streams: take_in would find every row, for nothing)
        self._end_ids = np.array(sorted(set().union(*(seq.end_ids for seq in seqs))), np.int64)
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

    def take_in(self, indices: list[int], token_ids: list[int]) -> list[int]:
        """The step's tokens in place of its placeholders (at `indices`) and at the end of the outputs, for every
        row (none of whose sequences ended since the launch); returns the rows that need per-token work: text
        built per token, a token among some row's end tokens (the engine checks its own), the last by length."""
        deque(map(list.__setitem__, self._tokens, indices, token_ids), maxlen=0)
        deque(map(list.append, self._outputs, token_ids), maxlen=0)
        work = self._per_token | (np.array(indices, np.int64) >= self._last_index)
        if len(self._end_ids):
            work |= np.isin(np.array(token_ids, np.int64), self._end_ids)
        return np.flatnonzero(work).tolist()
