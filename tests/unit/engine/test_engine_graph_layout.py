"""The CUDA-graph input layout, checked on CPU: decode batches padded to the graph ladder and prefill passes padded to
a token bucket (tokens of no sequence, empty chunks, prefill rows at the fixed offset after the largest decode
batch) must give the same greedy tokens and logits as the plain CPU path.

Graphs are emulated: "capture" keeps the forward closure the runner would capture and "replay" runs it, so every
step reads the persistent buffers exactly as a replayed graph does. Graph passes carry no host-side chunk list, so
attention runs through the Triton paged kernel (Triton's interpreter on CPU), as on the GPU."""

import pytest
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.model_runner import ModelRunner
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.models import attention


class _Emulated:
    def __init__(self, forward, what, replayed):
        self.forward, self.what, self.replayed = forward, what, replayed

    def replay(self):
        self.replayed.append(self.what)
        self.forward()


def _run(model_dir, recorder_cls, prompts):
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", max_num_seqs=4,
                                    max_num_batched_tokens=64))
    engine.sampler = recorder_cls()
    states, done = {}, {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=6))
        states[str(i)] = engine.requests[str(i)].sampling
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    logits = [torch.stack(engine.sampler.rows[id(states[str(i)])]) for i in range(len(prompts))]
    return [done[str(i)] for i in range(len(prompts))], logits, engine


# an empty flash-decoding split stores log2(0) = -inf on purpose (its merge weight is 0); numpy warns about it
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_graph_layout_matches_the_plain_path(tiny_models, recording_sampler, monkeypatch, interpreter_scalar_index):
    g = torch.Generator().manual_seed(8)
    # 5 + 20 + 37 + 70 tokens over a 64-token budget: a first pass of 4 chunks (over the graphs' 3: eager at the
    # fixed offset), then chunk passes that fit a bucket (one of them over cached context) mixed with decodes
    prompts = [torch.randint(0, 530, (n,), generator=g).tolist() for n in (5, 20, 37, 70)]
    plain_tokens, plain_logits, _ = _run(tiny_models["qwen2"], recording_sampler, prompts)

    init = ModelRunner.__init__

    def with_graphs(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.use_graphs, self.prefill_graph_seqs = True, 3

    replayed = []

    def capture(self, forward, pool, what):
        forward()
        return _Emulated(forward, what, replayed)

    monkeypatch.setattr(ModelRunner, "__init__", with_graphs)
    monkeypatch.setattr(ModelRunner, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 0))
    monkeypatch.setattr(attention, "reference_attention", attention._kernel_attention)
    tokens, logits, engine = _run(tiny_models["qwen2"], recording_sampler, prompts)

    assert sorted(engine.runner.prefill_graphs) == [16, 32, 64] and sorted(engine.runner.graphs) == [1, 2, 4]
    assert any(w.startswith("prefill") for w in replayed) and any(w.startswith("decode") for w in replayed)
    assert tokens == plain_tokens
    for plain, emulated in zip(plain_logits, logits, strict=True):
        assert (plain - emulated).abs().max() <= 1e-4 * plain.abs().max()
