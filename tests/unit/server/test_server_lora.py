"""LoRA over HTTP on the real server (real engine in its own process, tiny Qwen2 model) with the official openai
client: adapters given at start-up and loaded/unloaded at run time (vLLM's routes), listed in /v1/models with
the base model as parent, selected by a request's `model`. Outputs are checked against the offline engine with
the same adapter (whose parity with PEFT's merged model tests/unit/engine/test_engine_lora.py shows)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch
from server_helpers import MODEL_NAME, live_server, settings_for

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = "The quick brown fox"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(model_dir, out, seed, rank):
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL,
                                              init_lora_weights=False)).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"ad-a": _adapter(tiny_model, root / "a", 1, 4), "ad-b": _adapter(tiny_model, root / "b", 2, 8),
            "too-big": _adapter(tiny_model, root / "big", 3, 16)}


@pytest.fixture(scope="module")
def expected(tiny_model, adapters):
    """Greedy text of PROMPT for the base model and each adapter, from the offline engine."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", device="cpu",
                                    lora_modules={k: adapters[k] for k in ("ad-a", "ad-b")}))
    out = {}
    for lora in (None, "ad-a", "ad-b"):
        engine.add_request(str(lora), PROMPT, SamplingParams(temperature=0, ignore_eos=True, max_tokens=8), lora=lora)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[lora] = o.outputs[0].text
    assert len(set(out.values())) == 3  # the adapters change the output
    return out


@pytest.fixture(scope="module")
def server(tiny_model, adapters):
    settings = settings_for(tiny_model, engine={"lora_modules": {"ad-a": adapters["ad-a"]}, "max_loras": 2,
                                                "max_lora_rank": 8, "dtype": "float32"})
    with live_server(settings) as s:
        yield s


def _complete(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.model == model
    return r.choices[0].text


def test_adapters_listed_selected_loaded_and_unloaded(server, adapters, expected):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL_NAME, "ad-a"}
    assert models["ad-a"].model_extra["parent"] == MODEL_NAME and models["ad-a"].model_extra["root"] == adapters["ad-a"]
    assert models[MODEL_NAME].model_extra["parent"] is None
    assert _complete(client, MODEL_NAME) == expected[None]
    assert _complete(client, "ad-a") == expected["ad-a"]
    chat = client.chat.completions.create(model="ad-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.model == "ad-a"
    with pytest.raises(openai.NotFoundError, match="ad-b"):
        _complete(client, "ad-b")

    http = httpx.Client(base_url=server.url, timeout=60)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "ad-b", "lora_path": adapters["ad-b"]})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'ad-b' added successfully.")
    assert _complete(client, "ad-b") == expected["ad-b"]
    assert {m.id for m in client.models.list().data} == {MODEL_NAME, "ad-a", "ad-b"}
    # refused, naming why: the rank limit, a taken name, the base model's name, a missing directory
    cases = [({"lora_name": "big", "lora_path": adapters["too-big"]}, "lora_path", "rank 16 exceeds max_lora_rank 8"),
             ({"lora_name": "ad-a", "lora_path": adapters["ad-b"]}, "lora_name", "already loaded"),
             ({"lora_name": MODEL_NAME, "lora_path": adapters["ad-b"]}, "lora_name", "base model's name"),
             ({"lora_name": "c", "lora_path": "/nowhere"}, "lora_path", "not a directory")]
    for body, param, why in cases[:3]:
        r = http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and why in r.json()["error"]["message"]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400  # lora_path missing
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "ad-a"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'ad-a' removed successfully.")
    r = http.post("/v1/load_lora_adapter", json=cases[3][0])
    assert r.status_code == 400 and cases[3][2] in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        _complete(client, "ad-a")
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "ad-a"}).status_code == 404
    assert _complete(client, "ad-b") == expected["ad-b"] and _complete(client, MODEL_NAME) == expected[None]


def test_more_adapters_than_slots(tiny_model, adapters, expected):
    """Three adapters on two slots (max_loras 2): while both slots serve streams, a request for the third is a 503
    with Retry-After naming the busy adapters (vLLM's vllm:lora_requests_info names the running ones); once they
    end it takes the least recently used adapter's slot, and the evicted adapter answers again when asked for
    (placed again from its directory)."""
    modules = {"ad-a": adapters["ad-a"], "ad-b": adapters["ad-b"], "c": adapters["ad-b"]}  # c: ad-b's weights
    settings = settings_for(tiny_model, engine={"lora_modules": modules, "max_loras": 2, "max_lora_rank": 8,
                                                "dtype": "float32"}, retry_after_s=3)
    with live_server(settings) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {MODEL_NAME, "ad-a", "ad-b", "c"}
        streams = [client.completions.create(model=m, prompt=PROMPT, max_tokens=450, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True}) for m in ("ad-a", "ad-b")]
        for stream in streams:
            next(iter(stream))  # both requests are running: each holds its adapter's slot
        assert _lora_info(server) == ({"max_lora": "2", "running_lora_adapters": "ad-a,ad-b",
                                       "waiting_lora_adapters": ""}, pytest.approx(time.time(), abs=30))
        with pytest.raises(openai.InternalServerError) as exc:
            _complete(client, "c")
        assert exc.value.status_code == 503 and exc.value.response.headers["retry-after"] == "3"
        error = exc.value.body
        assert error["code"] == "lora_slots_busy" and error["type"] == "overloaded_error"
        assert "'c' is loaded but not resident, and all max_loras 2 adapter slots serve unfinished requests" in \
            error["message"]
        for stream in streams:
            stream.close()  # the server aborts them once it sees the client gone
        for _ in range(100):
            try:
                text = _complete(client, "c")
                break
            except openai.InternalServerError:
                time.sleep(0.1)
        else:
            pytest.fail("the adapter slots stayed busy 10 s after both streams were closed")
        assert text == expected["ad-b"]
        assert _complete(client, "ad-a") == expected["ad-a"] and _complete(client, "ad-b") == expected["ad-b"]
        assert _complete(client, "c") == expected["ad-b"]
        assert _lora_info(server)[0]["running_lora_adapters"] == ""


def _lora_info(server) -> tuple[dict, float]:
    """vLLM's vllm:lora_requests_info series (labels, value) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"]
    (sample,) = family.samples
    return sample.labels, sample.value
