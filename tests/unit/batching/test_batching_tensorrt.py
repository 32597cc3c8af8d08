"""The TensorRT backend against a fake `tensorrt` module (the real one needs an NVIDIA GPU host and is not
installable here): engine build settings, deserialization, per-batch input shapes within the optimization
profile, tensor addresses and execute_async_v3. Verified only against this fake, not real TensorRT."""

import ctypes
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deepfleet.batching.app import create_app
from deepfleet.batching.backends import load_backend
from deepfleet.batching.backends.tensorrt import WORKSPACE_BYTES, TensorRTBackend, build_engine, profile_shapes
from deepfleet.batching.errors import BackendUnavailable, ConfigError
from deepfleet.batching.repository import DynamicDim, ModelConfig, ModelEntry, TensorSpec
from deepfleet.batching.service import ModelService

PLAN = b"FAKE-PLAN-v1"
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _config(**settings):
    return ModelConfig(name="trt", backend="tensorrt", max_batch_size=8,
                       inputs=[TensorSpec(name="x", datatype="FP32", dims=["seq", 4])],
                       outputs=[TensorSpec(name="y", datatype="FP32", dims=["seq", 3])],
                       dynamic_dims={"seq": DynamicDim(buckets=[2, 4, 8])}, **settings)


def _view(ptr, shape):
    return np.ctypeslib.as_array((ctypes.c_float * int(np.prod(shape))).from_address(ptr)).reshape(shape)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        ok = all(a <= n <= b for a, n, b in zip(lo, shape, hi, strict=True))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name):
        x = self.shapes.get("x")
        return (x[0], x[1], 3) if x else (-1, -1, 3)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        x = _view(self.addresses["x"], self.shapes["x"])
        _view(self.addresses["y"], self.get_tensor_shape("y"))[...] = x @ W
        self.engine.launches.append((self.shapes["x"], stream))
        return True


class FakeEngine:
    num_io_tensors = 2
    profile = ((1, 2, 4), (8, 4, 4), (8, 8, 4))

    def __init__(self):
        self.launches = []

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def get_tensor_mode(self, name):
        return FAKE_TRT.TensorIOMode.INPUT if name == "x" else FAKE_TRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return self.profile

    def create_execution_context(self):
        return FakeContext(self)


class FakeBuilder:
    built: dict = {}

    def __init__(self, logger):
        pass

    def create_network(self, flags):
        return SimpleNamespace(flags=flags)

    def create_builder_config(self):
        cfg = SimpleNamespace(flags=[], pools={}, profiles=[])
        cfg.set_memory_pool_limit = lambda pool, size: cfg.pools.__setitem__(pool, size)
        cfg.set_flag = cfg.flags.append
        cfg.add_optimization_profile = cfg.profiles.append
        return cfg

    def create_optimization_profile(self):
        profile = SimpleNamespace(shapes={})
        profile.set_shape = lambda name, lo, opt, hi: profile.shapes.__setitem__(name, (lo, opt, hi))
        return profile

    def build_serialized_network(self, network, config):
        FakeBuilder.built = {"flags": config.flags, "pools": config.pools, "profiles": config.profiles}
        return bytearray(PLAN)


class FakeParser:
    num_errors = 0

    def __init__(self, network, logger):
        pass

    def parse(self, data):
        return data.startswith(b"ONNX")


FAKE_TRT = SimpleNamespace(
    Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
    Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: FakeEngine() if data == PLAN else None),
    TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
    nptype=lambda dtype: np.dtype(dtype).type,
    Builder=FakeBuilder,
    OnnxParser=FakeParser,
    MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    BuilderFlag=SimpleNamespace(FP16="FP16"),
)


class HostMemory:
    """Host arrays standing in for device buffers: addresses are real, so the fake engine reads and writes them."""

    stream_handle = 1234

    def to_device(self, array):
        return array.copy()

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def address(self, buffer):
        return buffer.ctypes.data

    def to_host(self, buffer):
        return buffer.copy()

    def synchronize(self):
        pass


def test_build_engine_uses_fp16_1gib_workspace_and_a_profile_from_the_config(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"ONNX...")
    plan = build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", _config(), trt=FAKE_TRT)
    assert plan.read_bytes() == PLAN
    built = FakeBuilder.built
    assert WORKSPACE_BYTES == 1 << 30
    assert built["flags"] == ["FP16"] and built["pools"] == {"WORKSPACE": 1 << 30}
    assert built["profiles"][0].shapes == {"x": ((1, 2, 4), (8, 4, 4), (8, 8, 4))}


def test_build_engine_reports_parse_failure(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="could not parse"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", _config(), trt=FAKE_TRT)


def test_unbounded_dims_cannot_get_a_profile():
    cfg = ModelConfig(name="m", backend="tensorrt", inputs=[TensorSpec(name="x", datatype="FP32", dims=[-1])],
                      outputs=[TensorSpec(name="y", datatype="FP32", dims=[1])])
    with pytest.raises(ConfigError, match=r"inputs\[0\].dims"):
        profile_shapes(cfg)


def test_run_binds_shapes_and_addresses_and_returns_engine_output(tmp_path):
    (tmp_path / "model.plan").write_bytes(PLAN)
    backend = TensorRTBackend(tmp_path / "model.plan", _config(), trt=FAKE_TRT, memory=HostMemory())
    x = np.random.default_rng(0).standard_normal((3, 4, 4)).astype(np.float32)
    y = backend.run({"x": x})["y"]
    np.testing.assert_allclose(y, x @ W, rtol=1e-6)
    assert backend._engine.launches == [((3, 4, 4), 1234)]
    with pytest.raises(ValueError, match="outside the engine profile"):
        backend.run({"x": np.zeros((9, 4, 4), np.float32)})


def test_bad_plan_and_config_mismatch_fail_at_load(tmp_path):
    (tmp_path / "bad.plan").write_bytes(b"other")
    with pytest.raises(ConfigError, match="could not deserialize"):
        TensorRTBackend(tmp_path / "bad.plan", _config(), trt=FAKE_TRT, memory=HostMemory())
    (tmp_path / "model.plan").write_bytes(PLAN)
    wrong = _config().model_copy(update={"outputs": [TensorSpec(name="z", datatype="FP32", dims=["seq", 3])]})
    with pytest.raises(ConfigError, match="'z' is not an engine output"):
        TensorRTBackend(tmp_path / "model.plan", wrong, trt=FAKE_TRT, memory=HostMemory())


def test_served_through_the_batcher_with_bucket_padding(tmp_path):
    (tmp_path / "model.plan").write_bytes(PLAN)
    backend = TensorRTBackend(tmp_path / "model.plan", _config(), trt=FAKE_TRT, memory=HostMemory())
    engine = backend._engine
    service = ModelService([ModelEntry(config=_config(), directory=tmp_path)], backends={"trt": backend})
    x = np.ones((1, 3, 4), np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 3, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    with TestClient(create_app(service)) as client:
        out = client.post("/v2/models/trt/infer", json=body).json()["outputs"][0]
    assert out["shape"] == [1, 3, 3]  # padded to the 4-bucket for the engine, cut back to 3
    np.testing.assert_allclose(np.array(out["data"]).reshape(1, 3, 3), x @ W, rtol=1e-6)
    assert engine.launches[-1][0] == (1, 4, 4)


def test_without_tensorrt_installed_the_backend_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where tensorrt exists
    (tmp_path / "model.plan").write_bytes(PLAN)
    with pytest.raises(BackendUnavailable, match="needs the NVIDIA tensorrt package"):
        load_backend(ModelEntry(config=_config(), directory=tmp_path))


def test_build_trt_engine_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from deepfleet.batching.repository import write_config
    from deepfleet.cli import app

    write_config(tmp_path / "trt", _config())
    (tmp_path / "trt" / "model.onnx").write_bytes(b"ONNX...")
    monkeypatch.setitem(sys.modules, "tensorrt", FAKE_TRT)
    result = CliRunner().invoke(app, ["build-trt-engine", str(tmp_path / "trt")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "trt" / "model.plan").read_bytes() == PLAN
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(app, ["build-trt-engine", str(tmp_path / "trt")])
    assert result.exit_code == 1 and "needs the NVIDIA tensorrt package" in result.output
