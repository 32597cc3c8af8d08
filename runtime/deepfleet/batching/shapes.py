"""Validation, padding/bucketing and un-padding of request tensors against a model's declared dims.

Dims in a config exclude the leading batch dim. A named dynamic dim is padded up to the smallest
bucket that holds it, so the backend sees few distinct shapes (good for TensorRT profiles, caches);
requests share a batch only when their `key` (bucket sizes and exact -1 sizes) is equal."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from deepfleet.batching.errors import InvalidInput
from deepfleet.batching.repository import ModelConfig


@dataclass(frozen=True)
class Prepared:
    """A validated request: arrays with their batch dim, row count, batch key and named-dim lengths."""

    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple
    lengths: dict[str, int]


def bucket_for(config: ModelConfig, dim: str, length: int, field: str) -> int:
    buckets = config.dynamic_dims[dim].buckets
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise InvalidInput(field, f"dim '{dim}' is {length}, above the largest bucket {buckets[-1]}")
    return buckets[i]


def prepare(config: ModelConfig, tensors: dict[str, np.ndarray], fields: dict[str, str]) -> Prepared:
    """Check `tensors` against the config; `fields` maps an input name to its place in the request."""
    for name in tensors:
        if name not in {s.name for s in config.inputs}:
            raise InvalidInput(fields.get(name, "inputs"), f"unknown input '{name}' for model '{config.name}'")
    rows: int | None = None
    lengths: dict[str, int] = {}
    exact: list[int] = []
    for spec in config.inputs:
        if spec.name not in tensors:
            raise InvalidInput("inputs", f"missing input '{spec.name}'")
        field = fields.get(spec.name, spec.name) + ".shape"
        shape = tensors[spec.name].shape
        if len(shape) != len(spec.dims) + 1:
            want = ["batch", *spec.dims]
            raise InvalidInput(field, f"expected {len(want)} dims {want}, got {list(shape)}")
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise InvalidInput(field, f"batch dim {shape[0]} differs from the other inputs' {rows}")
        for axis, (want, got) in enumerate(zip(spec.dims, shape[1:], strict=True), start=1):
            if isinstance(want, str):
                if got < 1:
                    raise InvalidInput(field, f"dim '{want}' must be at least 1")
                if lengths.setdefault(want, got) != got:
                    raise InvalidInput(field, f"dim '{want}' is {got} here but {lengths[want]} in another input")
            elif want == -1:
                exact.append(got)
            elif got != want:
                raise InvalidInput(field, f"dim {axis} must be {want}, got {got}")
    assert rows is not None  # config has at least one input
    if not 1 <= rows <= config.max_batch_size:
        raise InvalidInput(
            fields.get(config.inputs[0].name, "inputs") + ".shape",
            f"batch dim must be between 1 and max_batch_size {config.max_batch_size}, got {rows}",
        )
    buckets = tuple(
        (d, bucket_for(config, d, n, fields.get(_first_input_with(config, d), d) + ".shape"))
        for d, n in sorted(lengths.items())
    )
    return Prepared(inputs=tensors, rows=rows, key=(buckets, tuple(exact)), lengths=lengths)


def _first_input_with(config: ModelConfig, dim: str) -> str:
    return next(s.name for s in config.inputs if dim in s.dims)


def _pad(array: np.ndarray, dims: list[int | str], sizes: dict[str, int], value: float) -> np.ndarray:
    widths = [(0, 0)] + [
        (0, sizes[d] - n) if isinstance(d, str) else (0, 0) for d, n in zip(dims, array.shape[1:], strict=True)
    ]
    if not any(w for _, w in widths):
        return array
    return np.pad(array, widths, constant_values=np.asarray(value).astype(array.dtype))


def assemble(config: ModelConfig, batch: list[Prepared]) -> dict[str, np.ndarray]:
    """One array per input: each request padded to its bucket (equal across `batch`), rows concatenated."""
    sizes = dict(batch[0].key[0])
    out = {}
    for spec in config.inputs:
        parts = [_pad(p.inputs[spec.name], spec.dims, sizes, spec.pad_value) for p in batch]
        out[spec.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return out


def split(config: ModelConfig, outputs: dict[str, np.ndarray], batch: list[Prepared]) -> list[dict[str, np.ndarray]]:
    """Inverse of `assemble`: each request's rows, with named dims cut back to the request's own length."""
    results: list[dict[str, np.ndarray]] = [{} for _ in batch]
    total = sum(p.rows for p in batch)
    for spec in config.outputs:
        array = outputs[spec.name]
        if array.ndim != len(spec.dims) + 1 or array.shape[0] != total:
            raise RuntimeError(f"backend output '{spec.name}' has shape {list(array.shape)} for a batch of {total}")
        start = 0
        for i, p in enumerate(batch):
            part = array[start : start + p.rows]
            cut = tuple(slice(p.lengths[d]) if isinstance(d, str) else slice(None) for d in spec.dims)
            results[i][spec.name] = np.ascontiguousarray(part[(slice(None), *cut)])
            start += p.rows
    return results
