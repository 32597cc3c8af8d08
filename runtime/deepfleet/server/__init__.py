"""The OpenAI-compatible HTTP server (`deepfleet serve`): FastAPI app, engine process, admission, metrics."""
