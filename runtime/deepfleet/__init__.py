"""deepfleet runtime: DeepSeek-family inference engine, batching and OpenAI-compatible server."""

__version__ = "0.1.0"
