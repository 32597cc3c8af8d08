"""The sampler on CUDA: same answers as on CPU, seeded rows reproducible, and no host sync before the results."""

import warnings

import pytest
import torch

from deepfleet.engine.sampler import Sampler, SamplingState, make_generator
from deepfleet.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
VOCAB = 32000


def states(device, **overrides):
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=5),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1),
        SamplingParams(temperature=1.2, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, seed=2),
        SamplingParams(**overrides),
    ]
    return [
        SamplingState(p, list(range(100, 300)), list(range(5, 50)), make_generator(p.seed, device) if p.seed else None)
        for p in params
    ]


def logits_on(device):
    return (torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 4).to(device)


def test_penalties_and_greedy_match_cpu():
    cpu, gpu = logits_on("cpu"), logits_on("cuda")
    torch.testing.assert_close(
        Sampler._apply_penalties(gpu.clone(), states("cuda")).cpu(), Sampler._apply_penalties(cpu, states("cpu"))
    )
    assert Sampler()(gpu, states("cuda"))[0].token_id == Sampler()(cpu, states("cpu"))[0].token_id


def test_seeded_rows_reproduce_on_cuda_alone_and_batched():
    logits = logits_on("cuda")
    batched = [Sampler()(logits, states("cuda"))[1].token_id for _ in range(3)]
    alone_state = states("cuda")[1]
    alone = Sampler()(logits[1:2], [alone_state]).pop().token_id
    assert batched == [alone] * 3


def test_only_the_final_results_copy_synchronises():
    logits, seqs, sampler = logits_on("cuda"), states("cuda", logprobs=3), Sampler()
    sampler(logits, seqs)  # warm-up (lazy CUDA init would sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler(logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync_lines = {(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message)}
    assert sync_lines, "the sync debug mode reported nothing: the check would be vacuous"
    for filename, lineno in sync_lines:
        line = open(filename).read().splitlines()[lineno - 1]
        assert ".tolist()" in line, f"host sync at {filename}:{lineno}: {line.strip()}"


def test_logprobs_zero_in_every_row_on_cuda():
    seqs = [SamplingState(SamplingParams(logprobs=0), [1], []) for _ in range(4)]
    out = Sampler()(logits_on("cuda"), seqs)
    assert [t.top_logprobs for t in out] == [{}] * 4
