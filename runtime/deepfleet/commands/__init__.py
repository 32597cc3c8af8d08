"""Subcommand groups of the `deepfleet` CLI, one module per area, each exposing `register(app)`."""

from deepfleet.commands import batching, engine, plan, serve, weights

AREAS = (engine, serve, batching, weights, plan)
