"""Requests added with stream=False (LLM.generate's): reported only in the step they end in, their text decoded once
at the end unless stop strings need it per token. Expectations: the same request streamed, str.find on its text,
and a full decode of its tokens."""

import pytest

from deepfleet.engine import detokenizer
from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams


@pytest.fixture
def engine(tiny_models):
    return LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), device="cpu"))


def run(engine, requests):
    """requests: id -> (SamplingParams, stream). Every step's outputs: id -> [(finished, token count, text)]."""
    for rid, (params, stream) in requests.items():
        engine.add_request(rid, "Hello there", params, stream=stream)
    seen: dict[str, list] = {rid: [] for rid in requests}
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            c = o.outputs[0]
            seen[o.request_id].append((o.finished, len(c.token_ids), c.text))
            if o.finished:
                final[o.request_id] = c
    return seen, final


def greedy(max_tokens=30, **kw):
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens, **kw)


def test_offline_request_is_reported_once_with_the_streamed_text_and_never_detokenized_per_token(engine,
                                                                                               monkeypatch):
    appended = []
    append = detokenizer.IncrementalDetokenizer.append
    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "append",
                        lambda self, t: appended.append(self) or append(self, t))
    seen, final = run(engine, {"s": (greedy(), True), "o": (greedy(), False)})
    assert len(seen["s"]) == 30 and [f for f, _, _ in seen["o"]] == [True]
    assert final["o"].token_ids == final["s"].token_ids and len(final["o"].token_ids) == 30
    assert final["o"].text == final["s"].text == engine.tokenizer.decode(final["s"].token_ids)
    assert final["o"].finish_reason == "length"
    assert len(appended) == 30 and len(set(map(id, appended))) == 1  # the streamed request's only


def test_offline_request_with_a_stop_string_across_tokens_is_cut_where_it_starts(engine):
    _, free = run(engine, {"free": (greedy(), False)})
    full = engine.tokenizer.decode(free["free"].token_ids)
    pieces = [engine.tokenizer.decode(free["free"].token_ids[: i + 1]) for i in range(30)]
    boundary = next(len(p) for p in pieces[4:] if 2 <= len(p) < len(full) - 2)  # a token's text ends here
    stop = full[boundary - 1 : boundary + 2]  # so the stop string spans two tokens' text
    seen, final = run(engine, {"o": (greedy(stop=[stop]), False)})
    assert [f for f, _, _ in seen["o"]] == [True]
    assert (final["o"].text, final["o"].finish_reason, final["o"].stop_reason) == (
        full[: full.index(stop)], "stop", stop)


def test_offline_request_ending_on_a_stop_token_leaves_its_text_out(engine):
    _, free = run(engine, {"free": (greedy(), False)})
    tokens = free["free"].token_ids
    end = tokens[10]
    first = tokens.index(end)
    _, final = run(engine, {"o": (greedy(stop_token_ids=[end]), False), "s": (greedy(stop_token_ids=[end]), True)})
    for rid in ("o", "s"):
        c = final[rid]
        assert (c.token_ids, c.finish_reason, c.stop_reason) == (tokens[: first + 1], "stop", end)
        assert c.text == engine.tokenizer.decode(tokens[:first])


def test_aborted_offline_request_reports_its_text_so_far(engine):
    engine.add_request("o", "Hello there", greedy(), stream=False)
    for _ in range(8):
        assert engine.step() == []  # prefill, then decodes: nothing to report yet
    engine.abort_request("o")
    (out,) = engine.step()
    c = out.outputs[0]
    assert out.finished and c.finish_reason == "abort" and 0 < len(c.token_ids) < 30
    assert c.text == engine.tokenizer.decode(c.token_ids)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_no_forward_computes_a_token_past_max_tokens(tiny_models, async_scheduling):
    # with async scheduling the last token is in flight while the next step is scheduled: that step must not
    # compute another one for the sequence (it would be dropped); hand count: a 4-token prefill, then 4 decodes
    engine = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), device="cpu", async_scheduling=async_scheduling))
    computed = []
    execute = engine.runner.execute
    engine.runner.execute = lambda out, *a: computed.append([n for _, n in out.scheduled]) or execute(out, *a)
    engine.add_request("a", [5, 6, 7, 8], greedy(max_tokens=5), stream=False)
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert len(outs[0].outputs[0].token_ids) == 5
    assert computed == [[4], [1], [1], [1], [1]]
