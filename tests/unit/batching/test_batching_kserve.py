"""KServe v2 protocol through the ASGI app (TestClient runs the lifespan: models load, batchers start):
metadata and health, and the bad-input contract: 4xx with a JSON error naming the field, never a 5xx."""

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfleet.batching.app import create_app
from deepfleet.batching.service import ModelService

X = [float(i) for i in range(16)]
VALID = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": X}]}
INFER = "/v2/models/classifier/infer"


@pytest.fixture(scope="module")
def client(example_repo):
    app = create_app(ModelService.from_repository(example_repo), max_body_bytes=64 * 1024)
    with TestClient(app) as c:
        yield c


def test_health_metadata_and_readiness(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/embedder/ready").json() == {"name": "embedder", "ready": True}
    meta = client.get("/v2/models/embedder").json()
    assert meta["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
    assert meta["outputs"][1] == {"name": "token_states", "datatype": "FP32", "shape": [-1, -1, 8]}
    assert client.get("/v2").json()["extensions"] == ["schedule_policy"]


def test_valid_request_returns_outputs_and_echoes_id(client):
    r = client.post(INFER, json={**VALID, "id": "req-7", "outputs": [{"name": "logits"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == "classifier"
    assert body["outputs"][0]["shape"] == [1, 4] and len(body["outputs"][0]["data"]) == 4


def _with(**change):
    tensor = {**VALID["inputs"][0], **change}
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**VALID, "extra": 1}, "extra"),
        (_with(foo=1), "inputs[0].foo"),
        (_with(shape="1,16"), "inputs[0].shape"),
        (_with(shape=[1, 15]), "inputs[0].data"),
        (_with(shape=[1, 15], data=X[:15]), "inputs[0].shape"),
        (_with(shape=[-1, 16]), "inputs[0].shape"),
        (_with(datatype="INT64"), "inputs[0].datatype"),
        (_with(data=["a"] * 16), "inputs[0].data"),
        (_with(data=[[1.0] * 8, [2.0] * 7]), "inputs[0].data"),
        (_with(data=[None] * 16), "inputs[0].data"),
        (_with(name="y"), "inputs[0].name"),
        ({"inputs": []}, "inputs"),
        ({"inputs": VALID["inputs"] * 2}, "inputs[1].name"),
        ({**VALID, "outputs": [{"name": "nope"}]}, "outputs[0].name"),
        ({**VALID, "parameters": {"timeout": -5}}, "parameters.timeout"),
        ({**VALID, "parameters": {"timeout": "soon"}}, "parameters.timeout"),
        ({**VALID, "parameters": {"timeout": [1]}}, "parameters.timeout"),
        ([1, 2], "body"),
    ],
)
def test_bad_requests_get_400_naming_the_field(client, body, field):
    r = client.post(INFER, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(field), r.json()


def test_int_range_and_embedder_bucket_limit(client):
    ids = {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [2**63]}
    r = client.post("/v2/models/embedder/infer", json={"inputs": [ids]})
    assert r.status_code == 400 and r.json()["error"].startswith("inputs[0].data")
    long = {"shape": [1, 65], "datatype": "INT64", "data": [1] * 65}
    r = client.post("/v2/models/embedder/infer", json={"inputs": [{"name": "input_ids", **long},
                                                                  {"name": "attention_mask", **long}]})
    assert r.status_code == 400 and "largest bucket 64" in r.json()["error"]


@pytest.mark.parametrize(
    ("raw", "status", "start"),
    [
        (b'{"inputs": [', 400, "body: malformed JSON"),
        (b"\xff\xfe\x00", 400, "body: malformed JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 413, "body"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "body"),
        (b'{"inputs": [{"name": "x", "data": [' + b"1," * 40_000 + b'1]}]}', 413, "body"),
    ],
)
def test_malformed_and_oversize_bodies(client, raw, status, start):
    r = client.post(INFER, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(start)


def test_unknown_model_route_and_method_are_json_errors(client):
    r = client.post("/v2/models/nope/infer", json=VALID)
    assert r.status_code == 404 and "model 'nope' not found" in r.json()["error"]
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get(INFER).status_code == 405 and "error" in client.get(INFER).json()


def test_metrics_count_requests_by_status(client):
    client.post(INFER, json=VALID)
    client.post(INFER, json={"inputs": []})
    text = client.get("/metrics").text
    assert 'deepfleet_batcher_requests_total{model="classifier",status="ok"}' in text
    assert 'deepfleet_batcher_requests_total{model="classifier",status="invalid"}' in text
    assert "deepfleet_batcher_batch_size_bucket" in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
KEYS = ("name", "shape", "datatype", "data", "parameters", "inputs", "outputs", "id", "timeout")


@st.composite
def mutated_requests(draw):
    """A valid request with one part replaced by arbitrary JSON (schema-driven: every field gets hit)."""
    body = json.loads(json.dumps(VALID))
    tensor = body["inputs"][0]
    where = draw(st.sampled_from(["top", "tensor", "param", "output"]))
    key, value = draw(st.sampled_from(KEYS)), draw(json_values)
    if where == "top":
        body[key] = value
    elif where == "tensor":
        tensor[key] = value
    elif where == "param":
        body["parameters"] = {key: value}
    else:
        body["outputs"] = [{"name": value}] if draw(st.booleans()) else value
    return body


@settings(max_examples=150, deadline=None)
@given(body=mutated_requests() | json_values)
def test_fuzz_never_5xx_and_errors_are_json(client, body):
    r = client.post(INFER, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert client.get("/v2/health/live").status_code == 200


def test_versioned_routes_accept_only_the_configured_version(client):
    assert client.post("/v2/models/classifier/versions/1/infer", json=VALID).status_code == 200
    assert client.get("/v2/models/classifier/versions/1/ready").json()["ready"] is True
    r = client.post("/v2/models/classifier/versions/7/infer", json=VALID)
    assert r.status_code == 404 and "no version '7'" in r.json()["error"]
    assert client.get("/v2/models/classifier/versions/7").status_code == 404
