"""Green-list watermark: the hash, the logits processor, the detector, and detection through the engine on the
tiny random-weight model (high-entropy output, which favours detection: see bench/RESULTS.md)."""

import math

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.watermark.config import WatermarkConfig
from deepfleet.watermark.greenlist import GreenListProcessor, detect, is_green, key_seed

transformers = pytest.importorskip("transformers")
GAMMA, DELTA = 0.25, 2.0
N_SAMPLES, N_TOKENS = 100, 200


def test_green_share_is_gamma_and_depends_on_key_and_previous_token():
    vocab = torch.arange(152_064)
    a = is_green(key_seed("k"), torch.tensor(5), vocab, GAMMA)
    assert abs(a.float().mean().item() - GAMMA) < 0.005
    b = is_green(key_seed("k"), torch.tensor(6), vocab, GAMMA)
    c = is_green(key_seed("other"), torch.tensor(5), vocab, GAMMA)
    assert (a != b).float().mean() > 0.3 and (a != c).float().mean() > 0.3  # ~2 gamma (1 - gamma) = 0.375


def test_processor_adds_delta_to_green_logits_only():
    proc = GreenListProcessor(WatermarkConfig("k", GAMMA, DELTA), prompt_last_token=9)
    logits = torch.zeros(544)
    out = proc([], logits.clone())
    green = is_green(key_seed("k"), torch.tensor(9), torch.arange(544), GAMMA)
    assert torch.equal(out, green.float() * DELTA)
    out = proc([1, 2, 3], torch.zeros(544))  # the previous token is now the last output token
    assert torch.equal(out, is_green(key_seed("k"), torch.tensor(3), torch.arange(544), GAMMA).float() * DELTA)


def test_detector_z_score():
    seed, vocab = key_seed("k"), torch.arange(544)
    ids = [7]
    for _ in range(100):  # every token green after its predecessor: z = (100 - 25) / sqrt(100 * 0.1875) = 17.3
        ids.append(int(vocab[is_green(seed, torch.tensor(ids[-1]), vocab, GAMMA)][len(ids) % 50]))
    d = detect(ids, "k", GAMMA)
    assert d.green == d.tokens_scored == 100 and math.isclose(d.z, 75 / math.sqrt(18.75)) and d.watermarked
    assert not detect(ids, "another key", GAMMA).watermarked
    with pytest.raises(ValueError, match="at least 2 tokens"):
        detect([1], "k", GAMMA)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="watermark.key"):
        WatermarkConfig("")
    with pytest.raises(ValueError, match="watermark.gamma"):
        WatermarkConfig("k", gamma=1.0)
    with pytest.raises(ValueError, match="watermark.delta"):
        WatermarkConfig("k", delta=float("nan"))
    with pytest.raises(ValueError, match="watermark: expected a WatermarkConfig"):
        SamplingParams(watermark="k")


def _prompts(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 530, (8,), generator=g).tolist() for _ in range(n)]


def _run(model_dir, prompts, params_for, **kw):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", max_num_seqs=len(prompts),
                                    **kw))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params_for(i))
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return engine, [done[str(i)] for i in range(len(prompts))]


def test_greedy_unchanged_with_watermark_off(tiny_models):
    model_dir = tiny_models["qwen2"]
    prompts = _prompts(3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(24):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(p):])
    greedy = lambda i: SamplingParams(temperature=0, ignore_eos=True, max_tokens=24)  # noqa: E731
    engine, off = _run(model_dir, prompts, greedy)
    assert off == expected
    _, on = _run(model_dir, prompts, greedy, watermark_key="k")
    assert on != expected  # the bias moves greedy choices too


def test_detection_rate_and_false_positives(tiny_models):
    """delta 2, gamma 0.25, 200 tokens at temperature 1: >= 99% detected, <= 1% false positives (z > 4)."""
    prompts = _prompts(N_SAMPLES)
    sample = lambda i: SamplingParams(temperature=1.0, seed=i, ignore_eos=True, max_tokens=N_TOKENS)  # noqa: E731
    _, marked = _run(tiny_models["qwen2"], prompts, sample, watermark_key="deployment-key")
    _, plain = _run(tiny_models["qwen2"], prompts, sample)
    detected = [detect(t, "deployment-key", GAMMA) for t in marked]
    false = [detect(t, "deployment-key", GAMMA) for t in plain]
    rate = sum(d.watermarked for d in detected) / N_SAMPLES
    fpr = sum(d.watermarked for d in false) / N_SAMPLES
    assert rate >= 0.99 and fpr <= 0.01, (rate, fpr, min(d.z for d in detected), max(d.z for d in false))


def test_per_request_key_overrides_deployment(tiny_models):
    own = WatermarkConfig("request-key", GAMMA, DELTA)
    params = lambda i: SamplingParams(temperature=1.0, seed=i, ignore_eos=True, max_tokens=N_TOKENS,  # noqa: E731
                                      watermark=own)
    engine, out = _run(tiny_models["qwen2"], _prompts(4), params, watermark_key="deployment-key")
    assert all(detect(t, "request-key", GAMMA).watermarked for t in out)
    assert not any(detect(t, "deployment-key", GAMMA).watermarked for t in out)


def test_cli_detect_token_ids_and_bad_input():
    from typer.testing import CliRunner

    from deepfleet.cli import app

    seed, vocab, ids = key_seed("k"), torch.arange(544), [7]
    for _ in range(60):
        ids.append(int(vocab[is_green(seed, torch.tensor(ids[-1]), vocab, GAMMA)][len(ids)]))  # distinct pairs
    runner = CliRunner()
    res = runner.invoke(app, ["watermark", "detect", "--key", "k", "--token-ids", ",".join(map(str, ids))])
    # 60 distinct green pairs: z = (60 - 0.25 * 60) / sqrt(60 * 0.25 * 0.75) = 13.42
    assert res.exit_code == 0 and res.output.startswith("watermarked: z = 13.42"), res.output
    res = runner.invoke(app, ["watermark", "detect", "--token-ids", "1,2,3"], env={"DEEPFLEET_WATERMARK_KEY": ""})
    assert res.exit_code == 2 and "key: required" in res.output
    res = runner.invoke(app, ["watermark", "detect", "--key", "k", "--token-ids", "1,x"])
    assert res.exit_code == 2 and "token_ids: expected comma-separated integers" in res.output
