"""The output text is kept as chunks (engine/outputs.py TextSoFar): an output built each step costs nothing per
character, reads of a part copy only that part, an output keeps the text it had when it was built, and the
server's delta path streams exactly the text. Expectations: plain Python string slicing and a full decode."""

import pickle
import random

import pytest

from deepfleet.engine import outputs
from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.outputs import CompletionOutput, TextSoFar
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.server.engine_process import _DeltaDecoder, _DeltaEncoder


@pytest.mark.parametrize("seed", range(5))
def test_text_so_far_reads_like_slices_of_the_joined_string(seed):
    rng = random.Random(seed)
    text, full = TextSoFar(), ""
    for _ in range(200):
        piece = "".join(rng.choice("ab é€🙂\n") for _ in range(rng.randint(0, 5)))
        before = len(full)
        text.append(piece)
        full += piece
        assert len(text) == len(full)
        assert text.since(before, len(full)) == piece  # a reader one step behind (the streaming case)
        if before:
            assert text.since(before - 1, len(full)) == full[before - 1 :]
        a = rng.randint(0, len(full))
        b = rng.randint(a, len(full))
        assert text.since(a, b) == full[a:b]
        assert text.upto(b) == full[:b]


def test_an_output_keeps_the_text_it_was_built_with_and_pickles_as_a_string():
    text = TextSoFar()
    text.append("Hello")
    early = CompletionOutput(0, text, [1], None)
    text.append(", world")
    late = CompletionOutput(0, text, [1, 2], "stop")
    assert (early.text, early.text_len, early.text_since(2)) == ("Hello", 5, "llo")
    assert (late.text, late.text_since(5)) == ("Hello, world", ", world")
    copy = pickle.loads(pickle.dumps(late))
    assert copy == late and isinstance(copy._text, str)
    assert CompletionOutput(0, "abc", [], None) == CompletionOutput(0, "abc", [], None)


def test_engine_steps_never_join_the_whole_text(tiny_models, monkeypatch):
    """Per-step work must not grow with the output: without a reader of .text, no step joins the chunks."""
    joins = []
    upto = TextSoFar.upto
    monkeypatch.setattr(outputs.TextSoFar, "upto", lambda self, end: joins.append(end) or upto(self, end))
    engine = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), device="cpu"))
    engine.add_request("r", "Hello", SamplingParams(temperature=0, ignore_eos=True, max_tokens=40))
    last = None
    while engine.has_unfinished_requests():
        last = next((o for o in engine.step()), last)
    assert joins == []
    assert last.outputs[0].text == engine.tokenizer.decode(last.outputs[0].token_ids)


def test_streamed_snapshots_and_deltas_match_the_final_text_with_a_stop_string_across_steps(tiny_models):
    model = str(tiny_models["qwen2"])
    engine = LLMEngine(EngineConfig(model=model, device="cpu"))
    engine.add_request("free", "Hello", SamplingParams(temperature=0, ignore_eos=True, max_tokens=30))
    while engine.has_unfinished_requests():
        for o in engine.step():
            free = o.outputs[0]
    full = engine.tokenizer.decode(free.token_ids)
    assert free.text == full
    # a stop string that spans at least two tokens' text: it completes in a later step than it starts
    pieces = [engine.tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    boundary = next(len(p) for p in pieces[4:] if 2 <= len(p) < len(full) - 2)
    stop = full[boundary - 1 : boundary + 2]
    expected = full[: full.index(stop)]
    engine.add_request("stop", "Hello", SamplingParams(temperature=0, ignore_eos=True, max_tokens=30, stop=[stop]))
    encoder, decoder = _DeltaEncoder(), _DeltaDecoder()
    snapshots, streamed = [], ""
    while engine.has_unfinished_requests():
        outs = engine.step()
        for o in outs:
            snapshots.append((o.outputs[0], o.outputs[0].text))  # the text as it was at this step
        for got in decoder.decode(encoder.encode(outs)):
            streamed = got.outputs[0].text
    assert snapshots[-1][0].finish_reason == "stop" and snapshots[-1][0].stop_reason == stop
    assert all(out.text == text for out, text in snapshots)  # read later: still the step's text
    assert all(expected.startswith(text) for _, text in snapshots)
    assert snapshots[-1][1] == streamed == expected
