"""`deepfleet plan`: will a model fit, on what, for how many sequences, and what it costs against the cloud."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from deepfleet import defaults


def plan(
    model: Annotated[str, typer.Argument(help="preset (7b, 70b, v3, r1-distill-qwen-14b, ...), model directory "
                                              "or config.json")],
    dtype: Annotated[str | None, typer.Option(help="weights: bfloat16, float16, fp8 (block-scaled); default: the "
                                                   "checkpoint's")] = None,
    context: Annotated[int, typer.Option(help="tokens per sequence (prompt + output)")] = 8192,
    gpu: Annotated[list[str] | None, typer.Option(help="GPU type from the table (repeatable); default all")] = None,
    tp: Annotated[list[int] | None, typer.Option(help="tensor-parallel size (repeatable); default 1 2 4 8")] = None,
    memory_utilization: Annotated[float, typer.Option(help="share of GPU memory for weights + KV")] = (
        defaults.GPU_MEMORY_UTILIZATION),
    cloud_monthly: Annotated[float | None, typer.Option(help="cloud rent per month (default: the documents' "
                                                             "8xA100 example, 42,000)")] = None,
    onprem_capex: Annotated[float | None, typer.Option(help="on-prem purchase (default 280,000)")] = None,
    onprem_monthly: Annotated[float | None, typer.Option(help="on-prem running cost per month besides power "
                                                              "(default 11,565, implied by the example)")] = None,
    power_kw: Annotated[float, typer.Option(help="on-prem power draw incl. cooling, kW")] = 0.0,
    power_price: Annotated[float, typer.Option(help="price per kWh")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Size MODEL on every GPU type and tensor-parallel size: weights, KV bytes per token, whether it fits, how many
    sequences run at once, host RAM and NVMe, and months to pay back on-prem hardware against cloud rent."""
    from rich.console import Console

    from deepfleet.plan.render import render
    from deepfleet.plan.report import plan as make_plan

    try:
        report = make_plan(model, dtype=dtype, context=context, gpus=gpu, tp_sizes=tp,
                           memory_utilization=memory_utilization, cloud_monthly=cloud_monthly,
                           onprem_capex=onprem_capex, onprem_monthly=onprem_monthly, power_kw=power_kw,
                           power_price_per_kwh=power_price)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render(report, Console(width=160))


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
