"""The real HTTP server on 127.0.0.1 (uvicorn on a free port): concurrent clients get batched, and the
batched answers equal one-at-a-time ONNX Runtime answers; bucketed padding never leaks into outputs;
deadlines give 504 over the wire."""

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import uvicorn

from deepfleet.batching.app import create_app
from deepfleet.batching.examples import classifier_config
from deepfleet.batching.repository import ModelEntry
from deepfleet.batching.service import ModelService


class Server:
    def __init__(self, service: ModelService):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _tensor(name, array, datatype):
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}


async def _post_all(url, model, bodies):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post(f"/v2/models/{model}/infer", json=b) for b in bodies))


def test_concurrent_requests_are_batched_and_match_unbatched_onnxruntime(make_repo):
    repo = make_repo(max_batch_size=16, max_queue_delay_ms=50)
    session = ort.InferenceSession(str(repo / "classifier" / "model.onnx"))
    xs = np.random.default_rng(0).standard_normal((40, 1, 16)).astype(np.float32)
    with Server(ModelService.from_repository(repo)) as srv:
        replies = asyncio.run(_post_all(srv.url, "classifier", [{"inputs": [_tensor("x", x, "FP32")]} for x in xs]))
        metrics = httpx.get(srv.url + "/metrics").text
    for x, r in zip(xs, replies, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        alone = session.run(["logits"], {"x": x})[0]
        np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]), alone, rtol=1e-5, atol=1e-6)
    count = float(metrics.split('deepfleet_batcher_batch_size_count{model="classifier"}')[1].split()[0])
    assert count < 40 - 1  # fewer batches than requests (plus warm-up): requests were batched


def test_bucketed_padding_does_not_change_embeddings(make_repo):
    repo = make_repo(max_batch_size=8, max_queue_delay_ms=50)
    session = ort.InferenceSession(str(repo / "embedder" / "model.onnx"))
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 100, (1, n)).astype(np.int64) for n in (3, 5, 8, 9, 20)]
    bodies = [{"inputs": [_tensor("input_ids", s, "INT64"), _tensor("attention_mask", np.ones_like(s), "INT64")]}
              for s in seqs]
    with Server(ModelService.from_repository(repo)) as srv:
        replies = asyncio.run(_post_all(srv.url, "embedder", bodies))
    for s, r in zip(seqs, replies, strict=True):
        assert r.status_code == 200, r.text
        got = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}
        pooled, states = session.run(["pooled_embedding", "token_states"],
                                     {"input_ids": s, "attention_mask": np.ones_like(s)})
        assert got["token_states"].shape == (1, s.shape[1], 8)  # cut back from the 8/16/32 bucket
        np.testing.assert_allclose(got["pooled_embedding"], pooled, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["token_states"], states, rtol=1e-5, atol=1e-6)


def test_deadline_gives_504_over_http(tmp_path, fake_classifier):
    config = classifier_config(max_batch_size=1, max_queue_delay_ms=0)
    (tmp_path / "model.onnx").write_bytes(b"")
    entry = ModelEntry(config=config, directory=tmp_path)
    service = ModelService([entry], backends={"classifier": fake_classifier(seconds=1.0)})
    body = {"inputs": [_tensor("x", np.zeros((1, 16), np.float32), "FP32")], "parameters": {"timeout": 50_000}}
    with Server(service) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        client.get("/v2/health/live")  # connect first: only the request itself is timed
        start = time.monotonic()
        r = client.post("/v2/models/classifier/infer", json=body)
        assert r.status_code == 504 and "deadline" in r.json()["error"]
        assert time.monotonic() - start < 0.5  # the 50 ms deadline, not the 1 s the backend takes
        assert client.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize("n", [3])
def test_server_survives_many_bad_requests_then_serves(make_repo, n):
    with Server(ModelService.from_repository(make_repo())) as srv:
        for _ in range(n):
            assert httpx.post(srv.url + "/v2/models/classifier/infer", content=b"{oops").status_code == 400
        good = {"inputs": [_tensor("x", np.ones((2, 16), np.float32), "FP32")]}
        assert httpx.post(srv.url + "/v2/models/classifier/infer", json=good).json()["outputs"][0]["shape"] == [2, 4]
