import pytest
import torch

from deepfleet.models.tiny import make_tiny_model

torch.set_num_threads(1)  # tiny matmuls: OpenMP spin-waits cost more than they give on the shared 2-core machine


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    return {"qwen2": make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")}
