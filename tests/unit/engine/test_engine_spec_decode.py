"""Speculative decoding (engine/spec_decode): greedy output identical to the engine without it, token for token,
through one scripted run with chunked prefill, a prefix-cache hit, an abort and preemption, for n-gram drafts on
qwen2/llama and MTP drafts on the tiny DeepSeek-V3 (whose checkpoint carries an MTP layer, model.layers.3); the
MTP layer's KV bookkeeping gives the same drafts whatever the schedule; requests with penalties or logprobs are
served undrafted in the same batch; bad settings are refused naming the key. The same under tensor parallelism:
tests/unit/distributed/test_tensor_parallel.py (its scripted run, two gloo ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripted_requests import drive

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.spec_decode import config as spec_config
from deepfleet.models.tiny import make_tiny_model

PREFIX = list(range(100, 132))  # two full 16-token blocks shared by "a" and "b"


def _prompts() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(5)

    def rand(n):
        return torch.randint(0, 530, (n,), generator=g).tolist()

    phrase = rand(6)
    # repeated phrases give prompt lookup something to find; tiny random models also loop in their outputs
    return {"a": PREFIX + phrase * 3, "long": rand(30) + phrase * 10, "gone": rand(20), "b": PREFIX + rand(13),
            "c": rand(12) * 2, "pen": phrase * 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("qwen2", "llama", "deepseek_v3")}


def _engine(model_dir: Path, speculative=None, roomy: bool = False) -> LLMEngine:
    # 48-token budget: the 90-token prompt is prefilled in chunks; 16 blocks for ~20 needed: preemption
    tight = dict(max_num_batched_tokens=48, num_kv_blocks=16, max_num_seqs=4)
    room = dict(max_num_batched_tokens=512, num_kv_blocks=128, max_num_seqs=8)
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", async_scheduling=False,
                                  speculative=speculative, **(room if roomy else tight)))


def _scripted_run(engine: LLMEngine) -> dict:
    """Requests arrive over several steps; "b" reuses "a"'s prefix blocks; "gone" is aborted mid-generation;
    "pen" has a repetition penalty (never drafted for)."""
    prompts = _prompts()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=24)
    arrivals = {0: ["a", "long", "gone"], 3: ["b"], 5: ["c", "pen"]}
    penalty = SamplingParams(temperature=0, ignore_eos=True, max_tokens=24, repetition_penalty=1.3)
    done = drive(engine, prompts, arrivals, lambda rid: penalty if rid == "pen" else params)
    s = engine.stats()
    return {"done": done, "preemptions": s.num_preemptions, "prefix_hits": s.prefix_cache_hits, "spec": s.spec_decode}


@pytest.fixture(scope="module")
def reference(models) -> dict[str, dict]:
    return {arch: _scripted_run(_engine(d)) for arch, d in models.items()}


@pytest.mark.parametrize(("arch", "method", "k"), [("qwen2", "ngram", 3), ("llama", "ngram", 2),
                                                   ("deepseek_v3", "mtp", 2), ("deepseek_v3", "mtp", 1)])
def test_greedy_tokens_are_identical_with_speculation(models, reference, arch, method, k):
    got = _scripted_run(_engine(models[arch], {"method": method, "num_speculative_tokens": k}))
    ref = reference[arch]
    assert got["done"] == ref["done"]
    assert ref["done"]["gone"][0] == "abort" and len(got["done"]) == 6
    assert got["preemptions"] > 0 and got["prefix_hits"] > 0  # the run still preempts and hits the prefix cache
    spec = got["spec"]
    assert spec.num_drafts > 0 and spec.num_draft_tokens >= spec.num_drafts
    assert len(spec.accepted_per_position) == k and sum(spec.accepted_per_position) == spec.num_accepted_tokens
    if method == "ngram":  # both outcomes exercised: some drafts accepted, some rejected
        assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens


def test_mtp_drafts_do_not_depend_on_the_schedule(models):
    """The MTP layer's latent cache is filled position by position over prompt chunks, verified drafts and
    preemption recomputes; if any position's KV were missing or stale, the drafts made for the same tokens would
    differ between a tight schedule (chunks, preemption) and a roomy one."""
    runs = []
    for roomy in (False, True):
        engine = _engine(models["deepseek_v3"], {"method": "mtp", "num_speculative_tokens": 2}, roomy=roomy)
        drafts: dict[tuple[str, int], list[int]] = {}
        keep = engine.speculator.keep_mtp_drafts

        def record(requests, proposed, keep=keep, drafts=drafts):
            for (seq, _), d in zip(requests, proposed, strict=True):
                if d:
                    drafts[(seq.request_id, seq.num_tokens)] = list(d)
            keep(requests, proposed)

        engine.speculator.keep_mtp_drafts = record
        result = _scripted_run(engine)
        runs.append((result, drafts))
    (tight, tight_drafts), (roomy, roomy_drafts) = runs
    assert tight["preemptions"] > 0 and roomy["preemptions"] == 0
    del tight["done"]["gone"], roomy["done"]["gone"]  # aborted after a schedule-dependent number of tokens
    assert tight["done"] == roomy["done"]
    common = set(tight_drafts) & set(roomy_drafts)
    assert len(common) > 40
    assert {key: tight_drafts[key] for key in common} == {key: roomy_drafts[key] for key in common}


def test_mtp_layer_loads_from_the_checkpoint_only_when_asked(models):
    plain = _engine(models["deepseek_v3"], roomy=True)
    assert not hasattr(plain.runner.model, "mtp") or len(plain.runner.model.mtp) == 0
    engine = _engine(models["deepseek_v3"], {"method": "mtp", "num_speculative_tokens": 1}, roomy=True)
    params = dict(engine.runner.model.named_parameters())
    from safetensors import safe_open

    with safe_open(str(models["deepseek_v3"] / "model.safetensors"), "pt") as f:
        assert torch.equal(params["mtp.0.eh_proj.weight"], f.get_tensor("model.layers.3.eh_proj.weight"))
        head = f.get_tensor("model.layers.3.shared_head.head.weight")
        assert torch.equal(params["mtp.0.shared_head.head.weight"], head)
        w1 = f.get_tensor("model.layers.3.mlp.experts.1.gate_proj.weight")
    assert torch.equal(params["mtp.0.mlp.experts.w13"][1, : w1.shape[0]], w1)
    assert len(engine.runner.draft_kv_caches) == 1 and len(engine.runner.kv_caches) == 3


def test_mtp_loads_from_the_published_block_fp8_format(tmp_path):
    model = make_tiny_model(tmp_path / "fp8", "deepseek_v3", fp8=True, shards=2)
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", device="cpu", num_kv_blocks=32,
                                    speculative={"method": "mtp", "num_speculative_tokens": 1}))
    layer = engine.runner.model.mtp[0]
    assert layer.self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn  # the decoder layer is FP8 ...
    assert layer.eh_proj.weight.dtype == torch.float32  # ... eh_proj stays in the compute dtype, as published
    ref = LLMEngine(EngineConfig(model=str(model), dtype="float32", device="cpu", num_kv_blocks=32))
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)
    outs = []
    for e in (ref, engine):
        e.add_request("x", list(range(5, 25)), params)
        while e.has_unfinished_requests():
            for o in e.step():
                if o.finished:
                    outs.append(o.outputs[0].token_ids)
    assert outs[0] == outs[1]


def test_sampled_requests_run_and_keep_their_limits(models):
    engine = _engine(models["qwen2"], {"method": "ngram", "num_speculative_tokens": 3}, roomy=True)
    for i, prompt in enumerate(_prompts().values()):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=17,
                                                           ignore_eos=True))
    lengths = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                lengths[o.request_id] = len(o.outputs[0].token_ids)
                assert all(0 <= t < 544 for t in o.outputs[0].token_ids)
    assert lengths == {str(i): 17 for i in range(6)}
    assert engine.stats().spec_decode.num_drafts > 0


@pytest.mark.parametrize(("value", "needle"), [
    ({"method": "eagle"}, "engine.speculative.method: must be one of ngram, mtp, got 'eagle'"),
    ({"method": "ngram", "k": 2}, "engine.speculative.k: unknown key"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "engine.speculative.num_speculative_tokens: must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "engine.speculative.num_speculative_tokens: at most 8"),
    ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min: 4 exceeds"),
    ("ngram", "engine.speculative: expected a mapping"),
])
def test_bad_settings_are_refused_naming_the_key(value, needle):
    with pytest.raises(ValueError) as err:
        spec_config.parse(value)
    assert needle in str(err.value)


def test_mtp_on_a_model_without_mtp_layers_is_refused_before_loading(models):
    with pytest.raises(ValueError, match=r"engine.speculative.method: mtp needs a DeepSeek-V3/R1 checkpoint .* "
                                         r"arch 'qwen2'"):
        _engine(models["qwen2"], {"method": "mtp"})
