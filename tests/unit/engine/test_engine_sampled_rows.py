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


def _offline(rid: str, max_tokens: int) -> Sequence:
    seq = Sequence(rid, None, [1], SamplingParams(max_tokens=max_tokens))
    seq.text_per_token = False  # (as the engine sets it for a request not streamed, without stop strings)
    return seq


def test_take_in_writes_every_row_and_names_the_rows_that_need_work():
    plain, ends, texted = _offline("plain", 9), _offline("ends", 9), _offline("texted", 9)
    ends.end_ids = frozenset({42})
    texted.text_per_token = True
    last = _offline("last", 1)  # its first token is its last
    rows = SampledRows([plain, ends, texted, last])
    assert not rows.all_per_token and SampledRows([texted]).all_per_token  # (streams take the per-row loop)
    indices = rows.add_placeholders()
    assert indices == [1, 1, 1, 1]
    # 42 ends `ends`; on `plain` it is a row to check too (the engine finds it is not plain's end token)
    assert rows.take_in(indices, [42, 7, 8, 9]) == [0, 2, 3]
    assert [s.token_ids for s in (plain, ends, texted, last)] == [[1, 42], [1, 7], [1, 8], [1, 9]]
    assert [s.output_token_ids for s in (plain, ends, texted, last)] == [[42], [7], [8], [9]]
    indices = rows.add_placeholders()
    assert rows.take_in(indices, [5, 42, 6, 6]) == [1, 2, 3]
    assert plain.token_ids == [1, 42, 5] and ends.output_token_ids == [7, 42]
