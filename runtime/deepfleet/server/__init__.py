"""The OpenAI-compatible HTTP server (`deepfleet serve`): FastAPI app, async engine loop, admission, metrics."""
