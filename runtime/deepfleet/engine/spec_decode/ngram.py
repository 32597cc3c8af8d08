"""Prompt-lookup (n-gram) drafts: find the latest earlier occurrence of the sequence's last n tokens (n from
prompt_lookup_max down to prompt_lookup_min) in its own prompt and output, and propose the k tokens that followed
it. Costs no model work; pays off where outputs copy from the context (code edits, quoting, summaries).

The search scans the token ids with numpy once per n: O(length) per sequence and step, a few microseconds at
thousands of tokens. A suffix automaton would make it O(1) per step; not needed at these lengths yet."""

from __future__ import annotations

import numpy as np


def propose(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to `k` drafts following the most recent earlier match of the longest suffix that has one; [] if none."""
    length = len(token_ids)
    if length < n_min + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        # windows starting at 0 .. length - n - 1 (the suffix itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []
