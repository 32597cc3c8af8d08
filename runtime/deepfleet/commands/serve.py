"""`deepfleet serve MODEL_DIR`: the OpenAI-compatible HTTP server (see runtime/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deepfleet.server.config import SettingsError, load_settings, merge, parse_assignment, settings_reference

_EPILOG = (
    "Settings (file keys; env DEEPFLEET_<KEY>, DEEPFLEET_ENGINE__<KEY>; flag --set KEY=VALUE):\n\n"
    + "\n\n".join(settings_reference().splitlines())
)


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the root app."""

    @app.command("serve", epilog=_EPILOG)
    def serve(
        model_dir: Annotated[Path, typer.Argument(help="Model directory (config.json, *.safetensors, tokenizer).")],
        config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML settings file.")] = None,
        host: Annotated[str | None, typer.Option(help="Address to listen on (setting: host).")] = None,
        port: Annotated[int | None, typer.Option(help="Port (setting: port).")] = None,
        served_model_name: Annotated[
            str | None, typer.Option(help="Model id clients send (setting: served_model_name).")
        ] = None,
        max_concurrent: Annotated[int | None, typer.Option(help="Admission slots (setting: max_concurrent).")] = None,
        set_: Annotated[
            list[str] | None, typer.Option("--set", help="Any setting, e.g. --set engine.max_num_seqs=64 (repeat).")
        ] = None,
        print_config: Annotated[bool, typer.Option("--print-config", help="Print merged settings, exit.")] = False,
    ) -> None:
        """Serve MODEL_DIR over the OpenAI API (chat, completions, models), with /healthz, /readyz, /metrics.

        Precedence: defaults < --config file < DEEPFLEET_* environment < flags.
        """
        overrides: dict = {}
        try:
            for item in set_ or []:
                overrides = merge(overrides, parse_assignment(item))
            flags = {"host": host, "port": port, "served_model_name": served_model_name,
                     "max_concurrent": max_concurrent}
            overrides.update({k: v for k, v in flags.items() if v is not None})
            overrides["model"] = str(model_dir)
            settings = load_settings(config, overrides)
        except SettingsError as exc:
            raise typer.BadParameter(str(exc)) from None
        if print_config:
            typer.echo(json.dumps(settings.model_dump(), indent=2))
            return
        if not model_dir.is_dir():
            raise typer.BadParameter(f"{model_dir}: not a directory", param_hint="MODEL_DIR")
        from deepfleet.server.lifecycle import run

        raise typer.Exit(run(settings))

