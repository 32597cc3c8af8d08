"""Quantized weight formats: what a checkpoint's quantized tensors are, how they map onto a layer, and the layers
that compute with them. `spec` reads `quantization_config` / `engine.quantization`, `fp8` holds the block-FP8
format (quantize, dequantize, load into rows of a layer), `linear` the FP8 linear layer.

While a model is built under `building(spec)`, `deepfleet.models.layers.linear()` makes FP8 layers instead of plain
ones; nothing else in the model code needs to know the weight format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from deepfleet.quant.spec import QuantSpec

_ACTIVE: QuantSpec | None = None


def current() -> QuantSpec | None:
    """The quantization of the model being built, or None."""
    return _ACTIVE


@contextlib.contextmanager
def building(spec: QuantSpec | None) -> Iterator[None]:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, spec
    try:
        yield
    finally:
        _ACTIVE = previous
