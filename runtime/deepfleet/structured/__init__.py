"""Structured output: what a request asks for (`spec`, torch-free, built by the server) and the grammar backend
that enforces it in the engine (`xgrammar_backend`)."""
