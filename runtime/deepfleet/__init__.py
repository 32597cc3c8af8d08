"""deepfleet runtime: DeepSeek-family inference engine, batching and OpenAI-compatible server."""

__version__ = "0.1.0"

# Lazy exports (PEP 562): `deepfleet --version` must not import torch.
_EXPORTS = {
    "LLM": "deepfleet.llm",
    "SamplingParams": "deepfleet.engine.sampling_params",
    "LLMEngine": "deepfleet.engine.llm_engine",
    "EngineConfig": "deepfleet.engine.llm_engine",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deepfleet' has no attribute {name!r}")
