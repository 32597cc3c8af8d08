"""Request-level parameters and tensor decoding details of the KServe v2 JSON codec."""

import numpy as np
import pytest

from deepfleet.batching.errors import InvalidInput
from deepfleet.batching.examples import classifier_config
from deepfleet.batching.protocol import decode_tensor, parse_request, timeout_seconds

CFG = classifier_config(features=2, classes=2)


def _request(**parameters):
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    return parse_request({**body, "parameters": parameters} if parameters else body)


def test_timeout_is_microseconds_zero_means_none_and_model_default_applies():
    assert timeout_seconds(_request(timeout=250_000), CFG) == 0.25
    assert timeout_seconds(_request(timeout=0), CFG) is None
    assert timeout_seconds(_request(), CFG) is None
    with_default = classifier_config(features=2, classes=2, default_timeout_ms=40)
    assert timeout_seconds(_request(), with_default) == 0.04
    with pytest.raises(InvalidInput, match="parameters.timeout"):
        timeout_seconds(_request(timeout=True), CFG)


def test_nested_and_flat_data_decode_to_the_same_array():
    flat = parse_request({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    nested = parse_request({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}]})
    a, b = (decode_tensor(r.inputs[0], "inputs[0]", CFG) for r in (flat, nested))
    assert a.dtype == np.float32 and a.shape == (2, 2)
    np.testing.assert_array_equal(a, b)


def test_floats_are_refused_for_integer_inputs():
    from deepfleet.batching.examples import embedder_config

    req = parse_request({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1.5, 2]}]})
    with pytest.raises(InvalidInput, match=r"inputs\[0\].data: elements must be INT64"):
        decode_tensor(req.inputs[0], "inputs[0]", embedder_config())
