"""The `deepfleet` command. Each area registers its subcommands from `deepfleet.commands.<area>`;
heavy imports (torch, fastapi) happen inside the commands so `--help` and `--version` stay fast."""

import typer

from deepfleet import __version__
from deepfleet.commands import AREAS

app = typer.Typer(
    name="deepfleet",
    help="Serve and operate DeepSeek-family models: offline generation, OpenAI-compatible serving, planning.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"deepfleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """deepfleet runtime CLI."""


for area in AREAS:
    area.register(app)


def main() -> None:
    app()
