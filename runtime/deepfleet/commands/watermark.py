"""`deepfleet watermark detect`: is a text (or a list of token ids) green-list watermarked under a key?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deepfleet.watermark.config import DEFAULT_GAMMA, DEFAULT_Z_THRESHOLD

watermark_app = typer.Typer(help="Green-list output watermark (Kirchenbauer et al.): detection.",
                            no_args_is_help=True)


@watermark_app.command("detect")
def detect(
    text: Annotated[str | None, typer.Argument(help="the text to score (or --file / --token-ids)")] = None,
    key: Annotated[str, typer.Option(help="the deployment's or request's watermark key",
                                     envvar="DEEPFLEET_WATERMARK_KEY")] = "",
    model: Annotated[Path | None, typer.Option(help="model directory whose tokenizer generated the text")] = None,
    file: Annotated[Path | None, typer.Option(help="read the text from this file")] = None,
    token_ids: Annotated[str | None, typer.Option(help="comma-separated token ids instead of text")] = None,
    gamma: Annotated[float, typer.Option(help="green share used at generation")] = DEFAULT_GAMMA,
    z_threshold: Annotated[float, typer.Option(help="z above this reads as watermarked")] = DEFAULT_Z_THRESHOLD,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Count green tokens (each distinct previous-token/token pair once) and report the z-score; exit 0 either way,
    2 on bad input. Text is re-tokenized with --model's tokenizer; token ids score exactly what was generated."""
    from deepfleet.watermark.greenlist import detect as score

    try:
        if not key:
            raise ValueError("key: required (--key or $DEEPFLEET_WATERMARK_KEY)")
        if token_ids is not None:
            try:
                ids = [int(t) for t in token_ids.replace(" ", "").split(",") if t]
            except ValueError:
                raise ValueError(f"token_ids: expected comma-separated integers, got {token_ids[:40]!r}") from None
        else:
            if file is not None:
                text = file.read_text()
            if text is None:
                raise ValueError("text: give TEXT, --file or --token-ids")
            if model is None:
                raise ValueError("model: --model DIR is needed to tokenize text (or pass --token-ids)")
            from deepfleet.models.tokenizer import Tokenizer

            ids = Tokenizer(model).encode(text, add_special_tokens=False)
        result = score(ids, key, gamma, z_threshold)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        verdict = "watermarked" if result.watermarked else "not watermarked"
        typer.echo(f"{verdict}: z = {result.z:.2f} (threshold {z_threshold:g}), {result.green} of "
                   f"{result.tokens_scored} scored tokens green (expected {gamma:.0%} without the watermark), "
                   f"p = {result.p_value:.2e}")


def register(app: typer.Typer) -> None:
    app.add_typer(watermark_app, name="watermark")
