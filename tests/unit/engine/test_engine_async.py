"""The overlapped loop (async scheduling: step N+1 is scheduled and launched before step N's tokens reach the
host) gives the serial loop's outputs: the same greedy tokens, text, stop and finish reasons, with chunked
prefill, prefix hits, preemption under a tight KV pool, stop strings, max_model_len and an abort mid-way."""

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams


def _prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 70, (n,), generator=g).tolist()
    return [torch.randint(0, 530, (length,), generator=g).tolist() for length in lens]


def _run(model_dir, async_scheduling, requests, abort_after=None, **kw):
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", async_scheduling=async_scheduling, **kw))
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                c = o.outputs[0]
                done[o.request_id] = (list(c.token_ids), c.text, c.finish_reason, c.stop_reason)
        steps += 1
        if steps == abort_after:
            engine.abort_request("r1")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return done, engine


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
def test_async_and_serial_loops_give_identical_outputs(tiny_models, arch):
    shared = _prompts(1, seed=3)[0][:40]
    prompts = [(shared if i % 3 == 0 else []) + p for i, p in enumerate(_prompts(10, seed=4))]
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=20)
    serial, _ = _run(tiny_models[arch], False, [(f"r{i}", p, greedy) for i, p in enumerate(prompts)])
    stop = serial["r2"][1][4:7]  # a stop string from real output text, hit mid-generation
    requests = [(f"r{i}", p, greedy) for i, p in enumerate(prompts)]
    requests[2] = ("r2", prompts[2], SamplingParams(temperature=0, ignore_eos=True, max_tokens=20, stop=[stop]))
    requests[5] = ("r5", prompts[5], SamplingParams(temperature=0, ignore_eos=True, max_tokens=1))
    kw = dict(num_kv_blocks=24, max_num_batched_tokens=48, max_model_len=80)  # preempts, chunks, hits the limit
    want, serial_engine = _run(tiny_models[arch], False, requests, abort_after=6, **kw)
    got, async_engine = _run(tiny_models[arch], True, requests, abort_after=6, **kw)
    # an abort lands between steps: the overlapped loop has taken in one token fewer by then
    aborted_want, aborted_got = want.pop("r1"), got.pop("r1")
    assert aborted_want[2] == aborted_got[2] == "abort"
    assert aborted_want[0][: len(aborted_got[0])] == aborted_got[0]
    assert got == want
    assert want["r2"][2] == "stop" and want["r2"][3] == stop
    assert len(want["r5"][0]) == 1
    assert any(want[f"r{i}"][2] == "length" and len(p) + len(want[f"r{i}"][0]) == 80
               for i, p in enumerate(prompts) if i != 1)
    assert serial_engine.stats().num_preemptions > 0 and async_engine.stats().num_preemptions > 0


def test_requests_sampling_from_their_output_keep_the_loop_overlapped(tiny_models):
    """Penalties, a grammar and a watermark need the whole output so far: the previous step's tokens are taken in
    while the next step's forward runs, before that step is sampled. So the loop stays overlapped (after every step
    with requests left, one is in flight) and the outputs are the serial loop's, also next to plain requests."""
    pytest.importorskip("xgrammar")
    from deepfleet.structured.spec import StructuredOutput
    from deepfleet.watermark.config import WatermarkConfig

    penalised = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, repetition_penalty=1.3,
                               frequency_penalty=0.5)
    kinds = [penalised, SamplingParams(temperature=0, ignore_eos=True, max_tokens=12),
             SamplingParams(temperature=0, max_tokens=12, structured=StructuredOutput.choice(["ab", "cd ef"], "x")),
             SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, watermark=WatermarkConfig("k" * 16))]
    requests = [(f"r{i}", p, kinds[i % len(kinds)]) for i, p in enumerate(_prompts(8, seed=9))]
    want, _ = _run(tiny_models["llama"], False, requests)
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), device="cpu"))
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                c = o.outputs[0]
                got[o.request_id] = (list(c.token_ids), c.text, c.finish_reason, c.stop_reason)
        assert engine._in_flight is not None or not engine.has_unfinished_requests()
    assert got == want
