"""Subcommand groups of the `deepfleet` CLI, one module per area, each exposing `register(app)`."""

from deepfleet.commands import batching, doctor, engine, plan, serve, watermark, weights

AREAS = (engine, serve, batching, weights, plan, doctor, watermark)
