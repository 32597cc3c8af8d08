"""Engine commands: `generate` (offline generation), `make-tiny-model` (random-weight HF-format test models) and
`bench` (throughput benchmark, see bench/throughput.py). torch is imported inside the commands only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def generate(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory")],
    prompt: Annotated[list[str], typer.Argument(help="one or more prompts")],
    max_tokens: int = typer.Option(64, help="tokens to generate per prompt"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int | None = typer.Option(None),
    chat: bool = typer.Option(False, help="wrap each prompt as a user message with the model's chat template"),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
) -> None:
    """Generate text for PROMPT(s) with the model in MODEL_DIR."""
    from deepfleet import LLM, SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        llm = LLM(str(model_dir), dtype=dtype, device=device)
        if chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompt], params)
        else:
            outs = llm.generate(list(prompt), params)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    for p, out in zip(prompt, outs, strict=True):
        typer.echo(f"{p!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")


def make_tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="directory to write the model to")],
    arch: str = typer.Option("qwen2", help="qwen2, llama or deepseek_v3"),
    seed: int = typer.Option(0),
) -> None:
    """Write a small random-weight model in Hugging Face format (for tests and the lab)."""
    from deepfleet.models.tiny import make_tiny_model as make

    try:
        path = make(out_dir, arch, seed=seed)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"wrote {arch} model to {path}")


def bench(
    shape: str = typer.Option("1.5b", help="1.5b or 7b (DeepSeek-R1-Distill-Qwen shapes, random weights)"),
    num_requests: int = typer.Option(2000),
    prompt_len: int = typer.Option(128),
    output_len: int = typer.Option(128),
    hf_baseline: bool = typer.Option(True, help="also time Hugging Face transformers generate (needs transformers)"),
) -> None:
    """Throughput benchmark: batch-1 decode and offline throughput, with the HF baseline and the HBM floor."""
    from deepfleet.engine.benchmark import run

    run(shape=shape, num_requests=num_requests, prompt_len=prompt_len, output_len=output_len,
        hf_baseline=hf_baseline)


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the root app."""
    app.command("generate")(generate)
    app.command("make-tiny-model")(make_tiny_model)
    app.command("bench")(bench)
