"""The torch backend on a TorchScript archive and on a torch.export program, behind the batcher."""

import warnings

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from deepfleet.batching.app import create_app
from deepfleet.batching.examples import MLPClassifier, classifier_config
from deepfleet.batching.repository import write_config
from deepfleet.batching.service import ModelService


def _save(model, path):
    example = (torch.randn(2, 16),)
    if path.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.export.save(torch.export.export(model, example, dynamic_shapes=({0: batch},)), str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is in maintenance mode; still the format many ship
            torch.jit.trace(model, example).save(str(path))


@pytest.mark.parametrize("file_name", ["model.pt", "model.pt2"])
def test_torch_models_serve_batched_results_equal_to_eager(tmp_path, file_name):
    torch.manual_seed(0)
    model = MLPClassifier().eval()
    config = classifier_config(backend="torch", model_file=file_name, intra_op_threads=1)
    write_config(tmp_path / "classifier", config)
    _save(model, tmp_path / "classifier" / file_name)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [3, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
    with TestClient(create_app(ModelService.from_repository(tmp_path))) as client:
        r = client.post("/v2/models/classifier/infer", json=body)
    assert r.status_code == 200, r.text
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(3, 4), want, rtol=1e-5, atol=1e-6)
