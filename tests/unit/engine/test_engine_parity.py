"""Logit and greedy parity with Hugging Face transformers (float32, CPU) on tiny random-weight models of all three
architectures, through the whole engine: batched requests, prefill split into chunks, each request alone, and
prefix-cache hits. Reference: HF forward over the full sequence at every step (no HF cache involved)."""

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

ARCHS = ["qwen2", "llama", "deepseek_v3"]
NEW_TOKENS = 32
PROMPT_LENS = (5, 37, 90, 150)  # 150 + 32 crosses llama3/yarn's original context (64 / 128)


def _prompts(seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 530, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def reference(tiny_models):
    """arch -> (greedy continuations, logits at the last prompt position) from HF transformers."""
    out = {}
    for arch in ARCHS:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        conts, first_logits = [], []
        with torch.no_grad():
            for prompt in _prompts():
                ids = list(prompt)
                for step in range(NEW_TOKENS):
                    logits = model(torch.tensor([ids])).logits[0, -1]
                    if step == 0:
                        first_logits.append(logits)
                    ids.append(int(logits.argmax()))
                conts.append(ids[len(prompt):])
        out[arch] = (conts, first_logits)
    return out


def _generate(model_dir, recorder_cls, prompts, one_at_a_time=False, **kw):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **kw))
    engine.sampler = recorder_cls()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=NEW_TOKENS)
    tokens, first_logits = [], []
    batches = [[p] for p in prompts] if one_at_a_time else [prompts]
    for b, batch in enumerate(batches):
        states = []
        for i, p in enumerate(batch):
            engine.add_request(f"{b}-{i}", p, params)
            states.append(engine.requests[f"{b}-{i}"].sampling)
        done = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
        tokens += [done[f"{b}-{i}"] for i in range(len(batch))]
        first_logits += [engine.sampler.rows[id(s)][0] for s in states]
    return tokens, first_logits, engine


def _check(arch, reference, tokens, logits):
    ref_tokens, ref_logits = reference[arch]
    assert tokens == ref_tokens
    for got, ref in zip(logits, ref_logits, strict=True):
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["batched", "chunked", "alone"])
def test_matches_transformers(tiny_models, recording_sampler, reference, arch, mode):
    kw = {"chunked": dict(max_num_batched_tokens=24), "alone": dict(one_at_a_time=True)}.get(mode, {})
    tokens, logits, engine = _generate(tiny_models[arch], recording_sampler, _prompts(), **kw)
    _check(arch, reference, tokens, logits)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits_keep_parity(tiny_models, recording_sampler, reference, arch):
    prompts = _prompts()
    # alone, in order: the 150-token prompt runs after one that shares no prefix, then again with a full cache
    tokens, logits, engine = _generate(tiny_models[arch], recording_sampler, [prompts[3], prompts[3]],
                                       one_at_a_time=True)
    ref_tokens, ref_logits = reference[arch]
    assert tokens == [ref_tokens[3], ref_tokens[3]]
    for got in logits:
        assert (got - ref_logits[3]).abs().max() <= 1e-4 * ref_logits[3].abs().max()
    stats = engine.stats()
    assert stats.prefix_cache_hits == 144  # 9 full blocks of 16; the last prompt token is always recomputed
    assert stats.prefix_cache_queries == 2 * 144
