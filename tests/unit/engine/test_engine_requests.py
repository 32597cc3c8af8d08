"""LLMEngine request handling on a tiny model: preempted requests finish with the same greedy output, aborts and
timeouts free their blocks, bad requests are refused with errors naming the problem while others keep running,
and the offline LLM API (generate / chat) follows vLLM's shape."""

import time

import pytest
import torch

from deepfleet import LLM, SamplingParams
from deepfleet.engine.llm_engine import EngineConfig, LLMEngine

GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=24)


def _drain(engine):
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done


def _prompts(n=6, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 530, (int(L),), generator=g).tolist() for L in torch.randint(20, 60, (n,), generator=g)]


def test_preempted_requests_finish_with_the_same_output(tiny_models):
    # half the prompts share a 32-token prefix: the tight pool also exercises prefix hits and cached-block eviction
    shared = _prompts(1, seed=5)[0][:32]
    prompts = [(shared if i % 2 else []) + p for i, p in enumerate(_prompts())]
    roomy = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), device="cpu"))
    tight = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), device="cpu", num_kv_blocks=16))
    for engine in (roomy, tight):
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
    want, got = _drain(roomy), _drain(tight)
    assert tight.stats().num_preemptions > 0
    assert tight.stats().prefix_cache_hits > 0
    assert roomy.stats().num_preemptions == 0
    assert [got[k].outputs[0].token_ids for k in want] == [want[k].outputs[0].token_ids for k in want]
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks


def test_abort_timeout_and_bad_requests_leave_the_others_running(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), device="cpu"))
    engine.add_request("ok", "Hello world", GREEDY)
    engine.add_request("abort-me", "The quick brown fox", GREEDY)
    engine.add_request("late", [1, 2, 3], GREEDY, deadline=time.monotonic() - 1)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", [5] * engine.max_model_len, GREEDY)
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("ok", "again", GREEDY)
    with pytest.raises(ValueError, match="prompt: token ids"):
        engine.add_request("bad-ids", [1, 10**6], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("bad-params", "x", SamplingParams(temperature=-1))
    small = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), device="cpu", num_kv_blocks=4))
    refusal = r"60 tokens \+ max_tokens 20 = 80 tokens, but one sequence.s KV cache holds at most 64 tokens"
    with pytest.raises(ValueError, match=refusal):
        small.add_request("too-big", [1] * 60, SamplingParams(max_tokens=20))
    first = {o.request_id: o for o in engine.step()}
    assert first["late"].finished and first["late"].outputs[0].finish_reason == "timeout"
    engine.abort_request("abort-me")
    engine.abort_request("never-existed")
    done = _drain(engine)
    assert done["abort-me"].outputs[0].finish_reason == "abort"
    assert done["ok"].outputs[0].finish_reason == "length" and len(done["ok"].outputs[0].token_ids) == 24
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_stop_strings_and_stop_tokens(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), device="cpu"))
    engine.add_request("free", "Hello", SamplingParams(temperature=0, ignore_eos=True, max_tokens=20))
    text = _drain(engine)["free"].outputs[0]
    stop_tok = text.token_ids[5]
    stop_str = text.text[3:6]
    engine.add_request("tok", "Hello", SamplingParams(temperature=0, ignore_eos=True, max_tokens=20,
                                                      stop_token_ids=[stop_tok]))
    engine.add_request("str", "Hello", SamplingParams(temperature=0, ignore_eos=True, max_tokens=20, stop=[stop_str]))
    done = _drain(engine)
    tok = done["tok"].outputs[0]
    assert tok.finish_reason == "stop" and tok.stop_reason == stop_tok
    assert tok.token_ids == text.token_ids[: text.token_ids.index(stop_tok) + 1]
    s = done["str"].outputs[0]
    assert s.finish_reason == "stop" and s.stop_reason == stop_str
    assert s.text == text.text[: text.text.index(stop_str)]


def test_offline_llm_api(tiny_models):
    llm = LLM(model=str(tiny_models["deepseek_v3"]), dtype="float32", device="cpu", max_num_seqs=4,
              max_num_batched_tokens=64)
    outs = llm.generate(["Hello world", [5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [o.prompt for o in outs] == ["Hello world", None]
    assert all(len(o.outputs[0].token_ids) == 5 and isinstance(o.outputs[0].text, str) for o in outs)
    tok = llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tok.encode("Hello world")
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3))
    assert tok.decode(chat[0].prompt_token_ids, skip_special_tokens=False).endswith("<｜Assistant｜><think>\n")
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine", [3] * 600], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(tiny_models["qwen2"]), dtype="int3")
