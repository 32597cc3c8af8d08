"""LoRA adapters through the whole engine on the tiny Qwen2 and Llama models (float32, CPU).

Adapters are made and saved by PEFT itself (adapter_config.json + adapter_model.safetensors, random A and B so
they change the output); the expected tokens are greedy decoding of the model PEFT merged the adapter into
(merge_and_unload), run by HF transformers over the full sequence each step. Then: a batch mixing the base model
and four adapters (ranks 4/8/16, rsLoRA, q/v-only) equals each request alone; prefix-cache hits never cross
adapters; bad adapters are refused naming the reason; dynamic load/unload; more adapters loaded than slots
(least recently used idle adapter evicted, busy slots refused for now)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from deepfleet.engine.errors import SlotsBusy, StartupError
from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.outputs import LoRAStats
from deepfleet.engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig arguments
ADAPTERS = {
    "r8": {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    "r4-rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ALL},
    "r16-qv": {"r": 16, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "r2-mlp": {"r": 2, "lora_alpha": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
}
NEW_TOKENS = 12
PROMPTS = {"r8": 37, "r4-rslora": 5, "r16-qv": 21, "r2-mlp": 50, None: 33}  # adapter (None: base) -> prompt length


def _prompt(n, seed=3):
    return torch.randint(0, 530, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()


def _hf_greedy(model, prompt):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def setup(request, tiny_models, tmp_path_factory):
    """(model dir, adapter name -> dir, adapter name (None: base) -> HF greedy tokens of its prompt)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    dirs, expected = {}, {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kw))
        model.save_pretrained(root / name)
        dirs[name] = root / name
        expected[name] = _hf_greedy(model.merge_and_unload().eval(), _prompt(PROMPTS[name]))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    expected[None] = _hf_greedy(base, _prompt(PROMPTS[None]))
    return tiny_models[arch], dirs, expected


def _engine(model_dir, **kw):
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **kw))


def _run(engine, requests):
    """requests: [(id, prompt, adapter)] added together; returns id -> output tokens."""
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=NEW_TOKENS)
    for rid, prompt, lora in requests:
        engine.add_request(rid, prompt, params, lora=lora)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = (o.outputs[0].token_ids, o.num_cached_tokens)
    return done


def test_adapter_equals_peft_merged_model_and_mixed_batch_equals_alone(setup):
    model_dir, dirs, expected = setup
    engine = _engine(model_dir, lora_modules={k: str(v) for k, v in dirs.items()}, enable_prefix_caching=False,
                     max_num_batched_tokens=64)  # chunks: steps mix prefills with decodes of other adapters
    alone = {lora: _run(engine, [(f"alone-{lora}", _prompt(n), lora)])[f"alone-{lora}"][0]
             for lora, n in PROMPTS.items()}
    for lora in PROMPTS:
        assert alone[lora] == expected[lora], lora
    # the adapters do change the output: the same prompt through each gives five different continuations
    same = _run(engine, [(f"same-{lora}", _prompt(40), lora) for lora in PROMPTS])
    assert len({tuple(t) for t, _ in same.values()}) == len(PROMPTS)
    mixed = _run(engine, [(f"mixed-{lora}", _prompt(n), lora) for lora, n in PROMPTS.items()])
    assert {lora: mixed[f"mixed-{lora}"][0] for lora in PROMPTS} == alone


def test_prefix_cache_never_crosses_adapters(setup):
    model_dir, dirs, _ = setup
    engine = _engine(model_dir, lora_modules={"a": str(dirs["r8"]), "b": str(dirs["r4-rslora"])})
    prompt = _prompt(70)  # 4 full blocks of 16 can be reused
    base = _run(engine, [("base", prompt, None)])["base"]
    a1 = _run(engine, [("a1", prompt, "a")])["a1"]
    b1 = _run(engine, [("b1", prompt, "b")])["b1"]
    a2 = _run(engine, [("a2", prompt, "a")])["a2"]
    assert (a1[1], b1[1]) == (0, 0)  # no hit on the base model's or the other adapter's blocks
    assert a2[1] == 64 and a2[0] == a1[0]  # its own blocks are found, with the same output
    assert base[0] != a1[0]
    # reloaded under the same name, an adapter starts with no cached blocks (its weights may differ)
    engine.unload_lora_adapter("a")
    engine.load_lora_adapter("a", str(dirs["r16-qv"]))
    assert _run(engine, [("a3", prompt, "a")])["a3"][1] == 0


def _write_adapter(path, cfg, tensors):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **cfg}))
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))


def test_bad_adapters_are_refused_with_the_reason(setup, tmp_path):
    model_dir, dirs, _ = setup
    engine = _engine(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8)
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    ok = {key.format(0, "A"): torch.zeros(4, 64), key.format(0, "B"): torch.zeros(64, 4)}
    cases = {
        "rank": ({"r": 16, "target_modules": ["q_proj"]}, ok, "r: rank 16 exceeds max_lora_rank 8"),
        "module": ({"r": 4, "target_modules": ["q_proj", "embed_tokens"]}, ok, "unknown module 'embed_tokens'"),
        "missing": ({"r": 4, "target_modules": ["q_proj"]}, None, "missing file"),
        "hidden": ({"r": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "org/other-7B"},
                   {key.format(0, "A"): torch.zeros(4, 96), key.format(0, "B"): torch.zeros(64, 4)},
                   "base model mismatch: layer 0 q_proj maps 96 -> 64 features, the served model's maps 64 -> 64 "
                   "(the adapter's base_model_name_or_path: org/other-7B)"),
        "layers": ({"r": 4, "target_modules": ["q_proj"]}, {**ok, key.format(5, "A"): torch.zeros(4, 64),
                                                              key.format(5, "B"): torch.zeros(64, 4)},
                   "base model mismatch: it has weights for layer 5, the served model has 2 layers"),
        "dora": ({"r": 4, "target_modules": ["q_proj"], "use_dora": True}, ok, "use_dora: DoRA"),
        "half": ({"r": 4, "target_modules": ["q_proj"]}, {key.format(0, "A"): torch.zeros(4, 64)},
                 "layer 0 q_proj: lora_B is missing"),
    }
    for name, (cfg, tensors, why) in cases.items():
        _write_adapter(tmp_path / name, cfg, tensors)
        with pytest.raises(ValueError) as exc:
            engine.load_lora_adapter(name, str(tmp_path / name))
        assert f"LoRA adapter {name!r}: " in str(exc.value) and why in str(exc.value), (name, str(exc.value))
    with pytest.raises(ValueError, match="not a directory"):
        engine.load_lora_adapter("nowhere", str(tmp_path / "nowhere"))
    assert engine.lora_adapters() == {}  # nothing half-loaded
    engine.load_lora_adapter("one", str(dirs["r8"]))
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_lora_adapter("one", str(dirs["r8"]))
    # a request for an unknown adapter is refused; unload waits for the adapter's requests to end
    with pytest.raises(ValueError, match="'nope': not loaded"):
        engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2), lora="nope")
    engine.add_request("y", [1, 2, 3], SamplingParams(max_tokens=2), lora="one")
    with pytest.raises(ValueError, match="serves 1 unfinished request"):
        engine.unload_lora_adapter("one")
    while engine.has_unfinished_requests():
        engine.step()
    engine.unload_lora_adapter("one")
    assert engine.lora_adapters() == {}


def _collect(engine, outputs):
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids


def test_least_recently_used_idle_adapter_gives_its_slot(setup, tmp_path):
    """max_loras 2, five adapters loaded: a request for one that holds no slot takes the slot of the least recently
    used adapter serving no unfinished request (an adapter in use is never evicted), is refused for now when every
    slot is in use, and outputs stay those of PEFT's merged models throughout."""
    model_dir, dirs, expected = setup
    engine = _engine(model_dir, enable_lora=True, max_loras=2, enable_prefix_caching=False)
    lora = engine.runner.lora
    for name in ("r8", "r2-mlp", "r16-qv", "r4-rslora"):
        engine.load_lora_adapter(name, str(dirs[name]))  # a load beyond the slots registers the adapter
    assert list(lora.resident) == ["r8", "r2-mlp"] and set(engine.lora_adapters()) == set(ADAPTERS)

    def alone(name):
        return _run(engine, [(f"alone-{name}-{len(lora.resident)}", _prompt(PROMPTS[name]), name)]).popitem()[1][0]

    assert alone("r8") == expected["r8"]  # r8 used last: r2-mlp is the least recently used
    # r16-qv (q/v only) takes r2-mlp's slot (MLP only): nothing r2-mlp wrote there may remain
    assert alone("r16-qv") == expected["r16-qv"]
    assert list(lora.resident) == ["r8", "r16-qv"]
    # an evicted adapter stays loaded and comes back on demand, read again from its directory
    assert alone("r2-mlp") == expected["r2-mlp"]
    assert list(lora.resident) == ["r16-qv", "r2-mlp"]

    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=NEW_TOKENS)
    engine.add_request("long", _prompt(9), SamplingParams(temperature=0, ignore_eos=True, max_tokens=30),
                       lora="r16-qv")
    engine.add_request("short", _prompt(8), SamplingParams(temperature=0, ignore_eos=True, max_tokens=1),
                       lora="r2-mlp")
    with pytest.raises(SlotsBusy, match=r"'r8' is loaded but not resident, and all max_loras 2 adapter slots serve "
                                        r"unfinished requests \(r16-qv, r2-mlp\)"):
        engine.add_request("refused", _prompt(PROMPTS["r8"]), greedy, lora="r8")
    assert "refused" not in engine.requests
    assert engine.stats().lora == LoRAStats(2, (), ("r16-qv", "r2-mlp"))  # added, not scheduled yet
    outputs = {}
    while "short" in engine.requests:
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert "long" in engine.requests  # r16-qv is now the least recently used, but still busy: r2-mlp goes
    assert engine.stats().lora == LoRAStats(2, ("r16-qv",), ())
    engine.add_request("r8-now", _prompt(PROMPTS["r8"]), greedy, lora="r8")
    assert list(lora.resident) == ["r16-qv", "r8"]
    _collect(engine, outputs)
    assert outputs["r8-now"] == expected["r8"]
    # the running request was not disturbed by the slot beside it changing hands
    assert _run(engine, [("long-alone", _prompt(9), "r16-qv")])["long-alone"][0] == outputs["long"][:NEW_TOKENS]

    # an adapter whose directory no longer holds a servable adapter is refused on placement, and takes no slot
    shutil.copytree(dirs["r4-rslora"], tmp_path / "gone")
    engine.load_lora_adapter("gone", str(tmp_path / "gone"))
    (tmp_path / "gone" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="'gone': missing file"):
        engine.add_request("g", _prompt(5), greedy, lora="gone")
    assert list(lora.resident) == ["r8", "r16-qv"]  # r16-qv used last (long-alone)
    engine.unload_lora_adapter("gone")  # not resident: only forgotten
    engine.unload_lora_adapter("r8")  # resident: its slot is free again, and the next placement evicts no one
    assert alone("r4-rslora") == expected["r4-rslora"]
    assert list(lora.resident) == ["r16-qv", "r4-rslora"]


def test_lora_off_or_unsupported_is_said_plainly(tiny_models):
    engine = _engine(tiny_models["qwen2"])
    with pytest.raises(ValueError, match="LoRA is off here"):
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=1), lora="a")
    with pytest.raises(StartupError, match="quantization 'fp8' is not supported"):
        _engine(tiny_models["qwen2"], enable_lora=True, quantization="fp8")
    with pytest.raises(StartupError, match="Qwen2/Llama models, not 'deepseek_v3'"):
        _engine(tiny_models["deepseek_v3"], enable_lora=True)
