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
    fp8: bool = typer.Option(False, help="deepseek_v3 only: DeepSeek's published block-FP8 checkpoint format"),
    shards: int = typer.Option(1, min=1, help="split the weights over this many files (with an index)"),
) -> None:
    """Write a small random-weight model in Hugging Face format (for tests and the lab)."""
    from deepfleet.models.tiny import make_tiny_model as make

    try:
        path = make(out_dir, arch, seed=seed, fp8=fp8, shards=shards)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"wrote {arch} model to {path}")


def bench(
    shape: Annotated[list[str] | None, typer.Option(help="1.5b and/or 7b (random weights)")] = None,
    workload: Annotated[list[str] | None, typer.Option(help="latency, fixed, sharegpt, prefix, long, host")] = None,
    results: Annotated[Path | None, typer.Option(help="append the JSON records to this file")] = None,
    scale: float = typer.Option(1.0, help="fraction of each workload's request count (quick looks)"),
    quantization: str | None = typer.Option(None, help="fp8: weights quantized on load (engine.quantization)"),
) -> None:
    """Engine benchmarks (GPU): the workloads of engine/benchmark.py, a table, and JSON records."""
    from deepfleet.engine.benchmark import WORKLOADS, run

    run(shapes=tuple(shape or ("1.5b", "7b")), workloads=tuple(workload or WORKLOADS), out=results, scale=scale,
        quantization=quantization)


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the root app."""
    app.command("generate")(generate)
    app.command("make-tiny-model")(make_tiny_model)
    app.command("bench")(bench)
