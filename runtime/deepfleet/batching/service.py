"""The models of one repository, each loaded into its backend, warmed up and fronted by a batcher."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepfleet.batching import protocol
from deepfleet.batching.backends import load_backend
from deepfleet.batching.backends.base import Backend
from deepfleet.batching.batcher import DynamicBatcher
from deepfleet.batching.datatypes import NUMPY
from deepfleet.batching.errors import InvalidInput, ModelNotFound, ServiceUnavailable
from deepfleet.batching.metrics import BatcherMetrics
from deepfleet.batching.repository import ModelConfig, ModelEntry, load_repository
from deepfleet.batching.shapes import prepare

log = logging.getLogger(__name__)


@dataclass
class Model:
    config: ModelConfig
    batcher: DynamicBatcher
    ready: bool = False


def warmup_inputs(config: ModelConfig) -> dict[str, np.ndarray]:
    """One row of zeros at the smallest bucket: checks config against the model before serving."""
    sizes = {d: dd.buckets[0] for d, dd in config.dynamic_dims.items()}
    return {
        s.name: np.zeros([1] + [sizes[d] if isinstance(d, str) else (1 if d == -1 else d) for d in s.dims],
                         dtype=NUMPY[s.datatype])
        for s in config.inputs
    }


class ModelService:
    def __init__(self, entries: list[ModelEntry], backends: dict[str, Backend] | None = None):
        """`backends` overrides loading by name (tests inject fakes); others load from their model file."""
        self.metrics = BatcherMetrics()
        self._entries = entries
        self._backends = dict(backends or {})
        self.models: dict[str, Model] = {}

    @classmethod
    def from_repository(cls, root: Path) -> ModelService:
        return cls(load_repository(root))

    async def start(self) -> None:
        for entry in self._entries:
            config = entry.config
            if config.name in self.models:
                continue
            backend = self._backends.get(config.name) or await asyncio.to_thread(load_backend, entry)
            await asyncio.to_thread(backend.run, warmup_inputs(config))
            model = Model(config, DynamicBatcher(config, backend, self.metrics))
            model.batcher.start()
            model.ready = True
            self.models[config.name] = model
            log.info("model %s ready (%s, max_batch_size %d)", config.name, config.backend, config.max_batch_size)

    async def stop(self) -> None:
        for model in self.models.values():
            model.ready = False
            await model.batcher.stop()
            model.batcher.backend.close()
        self.models.clear()

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values())

    def get(self, name: str, version: str | None = None) -> Model:
        """The loaded model `name` (at `version`, when given): 404 if unknown, 503 if not loaded yet."""
        entry = next((e for e in self._entries if e.config.name == name), None)
        if entry is None:
            raise ModelNotFound(f"model '{name}' not found (models: {sorted(e.config.name for e in self._entries)})")
        if version is not None and version != entry.config.version:
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: ['{entry.config.version}'])")
        model = self.models.get(name)
        if model is None:
            raise ServiceUnavailable(f"model '{name}' is not ready")
        return model

    async def infer(self, name: str, body: object) -> dict:
        model = self.get(name)
        config = model.config
        try:
            request = protocol.parse_request(body)
            arrays, fields = protocol.decode_inputs(request, config)
            outputs = protocol.requested_outputs(request, config)
            timeout = protocol.timeout_seconds(request, config)
            prepared = prepare(config, arrays, fields)
        except InvalidInput:
            self.metrics.requests.labels(name, "invalid").inc()
            raise
        result = await model.batcher.infer(prepared, timeout)
        return protocol.encode_response(config, request, result, outputs)
