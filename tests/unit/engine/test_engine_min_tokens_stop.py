"""min_tokens holds back stop strings too, as vLLM: a stop string generated before min_tokens tokens does not end
the request; one completed after does (tiny model, greedy)."""

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams

PROMPT = [5, 17, 99, 230, 41, 8]


def _run(engine, **kw):
    engine.add_request("r", PROMPT, SamplingParams(temperature=0, ignore_eos=True, max_tokens=16, **kw))
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                return o.outputs[0]


def test_stop_strings_wait_for_min_tokens(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), dtype="float32", device="cpu"))
    free = _run(engine)
    tok = engine.tokenizer
    # a stop string the greedy output completes with its 2nd token (the first 2 tokens' text, minus the 1st's)
    head1, head2 = tok.decode(free.token_ids[:1]), tok.decode(free.token_ids[:2])
    stop = head2[len(head1):]
    assert stop and free.text.startswith(head2)
    early = _run(engine, stop=[stop])
    assert early.finish_reason == "stop" and len(early.token_ids) == 2
    assert early.text == free.text[: free.text.find(stop)]
    held = _run(engine, stop=[stop], min_tokens=6)
    assert len(held.token_ids) >= 6  # the early occurrence did not end it
    later = free.text.find(stop, len(head2))  # where the free text completes the stop string again, if it does
    if later >= 0 and len(tok.decode(free.token_ids[:6])) <= later:
        assert held.finish_reason == "stop" and held.text == free.text[:later]
    else:
        assert held.finish_reason == "length" and held.text == free.text
