"""Placeholders of a step's sampled rows (engine/sampled_rows.py): rows numbered in order, a placeholder appended to
every sequence with its index returned, final_pending set on the row whose placeholder is its last token by length,
and the same rows placing their placeholders again in the next step."""

from deepfleet.engine.sampled_rows import SampledRows
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.sequence import PLACEHOLDER, Sequence


def test_placeholders_rows_and_final_pending():
    a = Sequence("a", None, [5, 6, 7], SamplingParams(max_tokens=3))  # last index 5
    b = Sequence("b", None, [9], SamplingParams(max_tokens=1))  # last index 1: its first token is its last
    rows = SampledRows([a, b])
    assert (a.pending_row, b.pending_row) == (0, 1)
    assert rows.states == [a.sampling, b.sampling]
    assert rows.add_placeholders() == [3, 1]
    assert a.token_ids == [5, 6, 7, PLACEHOLDER] and b.token_ids == [9, PLACEHOLDER]
    assert (a.final_pending, b.final_pending) == (False, True)
    a.token_ids[3] = 8  # taken in
    assert rows.add_placeholders()[0] == 4 and a.token_ids == [5, 6, 7, 8, PLACEHOLDER]
    assert not a.final_pending
    rows.add_placeholders()
    assert a.final_pending and a.token_ids[5] == PLACEHOLDER
