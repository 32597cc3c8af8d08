"""Grammar masks in the engine (xgrammar, tiny Qwen2 model, CPU): the sampler fills every constrained row's mask
into one bitmask of the batch and applies it in one call. In one batch with constrained rows, a free row's greedy
tokens equal the same request run alone; constrained rows keep to their grammar (choice, regex), also with a
logit_bias on the same row pushing towards a token the grammar forbids. The same on a GPU."""

import re

import pytest

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.structured.spec import StructuredOutput

pytest.importorskip("xgrammar")

REGEX = "[0-9]{3}-[a-z]{2}"
CHOICES = ["alpha", "beta gamma"]


def _run(engine, requests):
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0]) for o in engine.step() if o.finished)
    return done


# on a GPU host the bitmask is pinned and applied to the logits on the device (CUDA graphs on for the free rows)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_constrained_and_free_rows_in_one_batch(tiny_models, device):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), dtype="float32", device=device,
                                    enable_prefix_caching=False, max_num_seqs=8))
    (x,) = engine.tokenizer.encode("x", add_special_tokens=False)
    free = SamplingParams(temperature=0, ignore_eos=True, max_tokens=10)
    choice = SamplingParams(temperature=0, max_tokens=16, structured=StructuredOutput.choice(CHOICES, "guided_choice"))
    regex = SamplingParams(temperature=0, max_tokens=16, logit_bias={x: 100.0},
                           structured=StructuredOutput("regex", REGEX, "guided_regex"))
    prompts = {"free": [5, 17, 99, 3, 250], "choice": [7, 8, 9], "regex": [300, 12, 44, 61]}
    alone = _run(engine, [("free-alone", prompts["free"], free)])["free-alone"]
    biased = _run(engine, [("biased", prompts["free"], SamplingParams(temperature=0, ignore_eos=True, max_tokens=3,
                                                                       logit_bias={x: 100.0}))])["biased"]
    assert biased.token_ids == [x] * 3  # the bias alone would pick x
    together = _run(engine, [("choice", prompts["choice"], choice), ("free", prompts["free"], free),
                             ("regex", prompts["regex"], regex)])
    assert together["free"].token_ids == alone.token_ids
    assert together["choice"].text in CHOICES and together["choice"].finish_reason == "stop"
    assert re.fullmatch(REGEX, together["regex"].text) and together["regex"].finish_reason == "stop"
