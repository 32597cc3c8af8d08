"""Model repository: a directory with one sub-directory per model, each holding `config.yaml` and the
model file. The config follows Triton's model configuration in spirit (max_batch_size, dims with -1 for
dynamic sizes, dynamic batching settings) in a small YAML form:

    name: classifier              # defaults to the directory name, must equal it
    backend: onnxruntime          # onnxruntime | torch | tensorrt
    max_batch_size: 32            # rows per batch; 1 disables batching
    max_queue_delay_ms: 5
    inputs:  [{name: x, datatype: FP32, dims: [16]}]      # dims exclude the batch dim
    outputs: [{name: y, datatype: FP32, dims: [4]}]

A dim is a positive int (fixed), -1 (dynamic: only requests of equal size share a batch) or a name
declared under `dynamic_dims` with buckets: requests are padded up to the smallest bucket that fits,
batched with others of the same bucket, and outputs carrying the same named dim are cut back."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deepfleet.batching.errors import ConfigError
from deepfleet.defaults import BATCHER_MAX_BATCH_SIZE, BATCHER_MAX_QUEUE_DELAY_MS

CONFIG_FILE = "config.yaml"
DEFAULT_MODEL_FILE = {"onnxruntime": "model.onnx", "torch": "model.pt", "tensorrt": "model.plan"}
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")

_STRICT = ConfigDict(extra="forbid")


class TensorSpec(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1)
    datatype: Literal[DATATYPES]  # type: ignore[valid-type]
    dims: list[int | str]
    pad_value: float = 0  # value written into padded positions of named dims

    @field_validator("dims")
    @classmethod
    def _dims(cls, dims: list[int | str]) -> list[int | str]:
        for d in dims:
            if isinstance(d, int) and d != -1 and d < 1:
                raise ValueError(f"dim {d}: use a positive size, -1 (dynamic) or a dynamic_dims name")
        return dims


class DynamicDim(BaseModel):
    model_config = _STRICT
    buckets: list[int] = Field(min_length=1)

    @field_validator("buckets")
    @classmethod
    def _increasing(cls, buckets: list[int]) -> list[int]:
        if buckets[0] < 1 or any(b <= a for a, b in zip(buckets, buckets[1:], strict=False)):
            raise ValueError("buckets must be positive and strictly increasing")
        return buckets


class AdaptiveSettings(BaseModel):
    """Load-based batch-size control (see adaptive.py); off unless enabled."""

    model_config = _STRICT
    enabled: bool = False
    min_batch_size: int = Field(1, ge=1)
    interval_ms: float = Field(100.0, gt=0)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backend: Literal["onnxruntime", "torch", "tensorrt"]
    model_file: str | None = None
    version: str = "1"
    max_batch_size: int = Field(BATCHER_MAX_BATCH_SIZE, ge=1)
    max_queue_delay_ms: float = Field(BATCHER_MAX_QUEUE_DELAY_MS, ge=0)
    max_queue_size: int = Field(1024, ge=1)  # queued rows before new requests get 503 (backpressure)
    default_timeout_ms: float | None = Field(None, gt=0)
    instances: int = Field(1, ge=1)  # batches executed concurrently
    intra_op_threads: int | None = Field(None, ge=1)
    adaptive: AdaptiveSettings = AdaptiveSettings()
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    dynamic_dims: dict[str, DynamicDim] = {}

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: tensor names must be unique")
        input_dims = {d for s in self.inputs for d in s.dims if isinstance(d, str)}
        for spec in self.inputs + self.outputs:
            for d in spec.dims:
                if isinstance(d, str) and d not in self.dynamic_dims:
                    raise ValueError(f"{spec.name}: dim '{d}' is not declared under dynamic_dims")
        for spec in self.outputs:
            for d in spec.dims:
                if isinstance(d, str) and d not in input_dims:
                    raise ValueError(f"{spec.name}: output dim '{d}' must also appear in an input")
        if self.adaptive.min_batch_size > self.max_batch_size:
            raise ValueError("adaptive.min_batch_size exceeds max_batch_size")
        return self

    @property
    def file_name(self) -> str:
        return self.model_file or DEFAULT_MODEL_FILE[self.backend]


class ModelEntry(BaseModel):
    config: ModelConfig
    directory: Path

    @property
    def model_path(self) -> Path:
        return self.directory / self.config.file_name


def _error_text(exc: ValidationError) -> str:
    return "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors())


def read_config(directory: Path) -> ModelConfig:
    """A model directory's config.yaml, validated (the model file need not exist yet)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping")
    raw.setdefault("name", directory.name)
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_error_text(exc)}") from exc
    if config.name != directory.name:
        raise ConfigError(f"{path}: name '{config.name}' must equal the directory name '{directory.name}'")
    return config


def load_model(directory: Path) -> ModelEntry:
    entry = ModelEntry(config=read_config(directory), directory=Path(directory))
    if not entry.model_path.is_file():
        raise ConfigError(f"{Path(directory) / CONFIG_FILE}: model file {entry.model_path} not found")
    return entry


def load_repository(root: Path) -> list[ModelEntry]:
    """Every sub-directory of `root` with a config.yaml is a model; sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: model repository directory not found")
    entries = [load_model(d) for d in sorted(root.iterdir()) if (d / CONFIG_FILE).is_file()]
    if not entries:
        raise ConfigError(f"{root}: no model directories with {CONFIG_FILE}")
    return entries


def write_config(directory: Path, config: ModelConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json", exclude_defaults=True)
    data["name"] = config.name
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
