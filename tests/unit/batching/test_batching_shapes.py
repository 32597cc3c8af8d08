import numpy as np
import pytest

from deepfleet.batching.errors import InvalidInput
from deepfleet.batching.examples import classifier_config, embedder_config
from deepfleet.batching.shapes import assemble, prepare, split

EMB = embedder_config(dim=3, buckets=(4, 8))


def _tokens(lengths, first=1):
    ids = [np.arange(first, first + n, dtype=np.int64)[None, :] for n in lengths]
    return [{"input_ids": a, "attention_mask": np.ones_like(a)} for a in ids]


def test_named_dim_goes_to_smallest_bucket_that_fits():
    keys = [prepare(EMB, t, {}).key for t in _tokens([1, 4, 5, 8])]
    assert [dict(k[0])["seq"] for k in keys] == [4, 4, 8, 8]


def test_longer_than_largest_bucket_is_rejected_naming_the_field():
    with pytest.raises(InvalidInput) as exc:
        prepare(EMB, _tokens([9])[0], {"input_ids": "inputs[0]", "attention_mask": "inputs[1]"})
    assert exc.value.field == "inputs[0].shape" and "largest bucket 8" in exc.value.message


def test_assemble_pads_with_pad_value_and_split_cuts_back():
    preps = [prepare(EMB, t, {}) for t in _tokens([2, 3])]
    batch = assemble(EMB, preps)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    states = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    pooled = np.ones((2, 3), dtype=np.float32)
    parts = split(EMB, {"pooled_embedding": pooled, "token_states": states}, preps)
    assert parts[0]["token_states"].shape == (1, 2, 3) and parts[1]["token_states"].shape == (1, 3, 3)
    np.testing.assert_array_equal(parts[1]["token_states"][0], states[1, :3])
    assert parts[0]["pooled_embedding"].shape == (1, 3)


def test_multi_row_requests_are_split_by_rows():
    cfg = classifier_config(features=2, classes=2)
    preps = [prepare(cfg, {"x": np.zeros((n, 2), np.float32)}, {}) for n in (3, 1)]
    out = np.arange(8, dtype=np.float32).reshape(4, 2)
    parts = split(cfg, {"logits": out}, preps)
    np.testing.assert_array_equal(parts[0]["logits"], out[:3])
    np.testing.assert_array_equal(parts[1]["logits"], out[3:])


@pytest.mark.parametrize(
    ("tensors", "field", "text"),
    [
        ({"x": np.zeros((1, 3), np.float32)}, "inputs[0].shape", "must be 2"),
        ({"x": np.zeros((1, 2, 1), np.float32)}, "inputs[0].shape", "expected 2 dims"),
        ({"x": np.zeros((0, 2), np.float32)}, "inputs[0].shape", "between 1 and max_batch_size 4"),
        ({"x": np.zeros((5, 2), np.float32)}, "inputs[0].shape", "between 1 and max_batch_size 4"),
        ({}, "inputs", "missing input 'x'"),
    ],
)
def test_bad_shapes_name_the_field(tensors, field, text):
    cfg = classifier_config(features=2, classes=2, max_batch_size=4)
    with pytest.raises(InvalidInput) as exc:
        prepare(cfg, tensors, {"x": "inputs[0]"})
    assert exc.value.field == field and text in exc.value.message


def test_inputs_sharing_a_named_dim_must_agree():
    t = {"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    with pytest.raises(InvalidInput, match="dim 'seq' is 4 here but 3"):
        prepare(EMB, t, {})


def test_exact_dynamic_dims_only_batch_with_equal_sizes():
    from deepfleet.batching.repository import ModelConfig, TensorSpec

    cfg = ModelConfig(name="m", backend="onnxruntime", inputs=[TensorSpec(name="x", datatype="FP32", dims=[-1])],
                      outputs=[TensorSpec(name="y", datatype="FP32", dims=[1])])
    a, b, c = (prepare(cfg, {"x": np.zeros((1, n), np.float32)}, {}) for n in (3, 3, 5))
    assert a.key == b.key != c.key
