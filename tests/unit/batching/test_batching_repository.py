import pytest
import yaml

from deepfleet.batching.errors import ConfigError
from deepfleet.batching.repository import load_model, load_repository
from deepfleet.defaults import BATCHER_MAX_BATCH_SIZE, BATCHER_MAX_QUEUE_DELAY_MS


def _write(directory, config, model_file="model.onnx"):
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / model_file).write_bytes(b"")
    return directory


BASE = {
    "backend": "onnxruntime",
    "inputs": [{"name": "x", "datatype": "FP32", "dims": ["seq"]}],
    "outputs": [{"name": "y", "datatype": "FP32", "dims": ["seq", 2]}],
    "dynamic_dims": {"seq": {"buckets": [8, 16]}},
}


def test_defaults_come_from_deepfleet_defaults(tmp_path):
    entry = load_model(_write(tmp_path / "m", BASE))
    assert entry.config.name == "m"
    assert entry.config.max_batch_size == BATCHER_MAX_BATCH_SIZE
    assert entry.config.max_queue_delay_ms == BATCHER_MAX_QUEUE_DELAY_MS


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"backend": "tensorflow"}, "backend"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"surprise": 1}, "surprise"),
        ({"dynamic_dims": {}}, "dim 'seq' is not declared"),
        ({"dynamic_dims": {"seq": {"buckets": [16, 8]}}}, "strictly increasing"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "dims": [0]}]}, "dim 0"),
        ({"name": "other"}, "must equal the directory name"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "dims": ["tok"]}], "dynamic_dims": {"seq": {"buckets": [8]},
          "tok": {"buckets": [8]}}}, "must also appear in an input"),
    ],
)
def test_invalid_configs_fail_at_load_naming_the_problem(tmp_path, change, text):
    with pytest.raises(ConfigError, match=text):
        load_model(_write(tmp_path / "m", {**BASE, **change}))


def test_missing_model_file_and_empty_repository(tmp_path):
    d = _write(tmp_path / "m", BASE)
    (d / "model.onnx").unlink()
    with pytest.raises(ConfigError, match="model file"):
        load_model(d)
    with pytest.raises(ConfigError, match="no model directories"):
        load_repository(tmp_path / "m")
