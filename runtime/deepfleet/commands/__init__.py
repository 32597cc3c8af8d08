"""Subcommand groups of the `deepfleet` CLI, one module per area, each exposing `register(app)`."""

from deepfleet.commands import engine, serve

AREAS = (engine, serve)
