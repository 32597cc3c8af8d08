"""Subcommands of this area (filled in by its issue)."""

import typer


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the root app."""
