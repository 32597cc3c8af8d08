"""The plan as rich tables: the model's footprint, one row per GPU type x tensor-parallel size, host needs, cost."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

GIB = 1 << 30


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def render(report: dict[str, Any], console: Console) -> None:
    m, host, pay = report["model"], report["host"], report["cost"]
    heads, k_dim, v_dim = m["kv_layout"]
    kv_what = f"{heads} kv heads x ({k_dim} + {v_dim})" if v_dim else f"latent {k_dim} (MLA, values inside)"
    console.print(f"[bold]{m['name']}[/] ({m['arch']}): {m['params'] / 1e9:,.2f} B parameters, "
                  f"{m['weight_dtype']} weights {_gib(m['weight_bytes'])}")
    console.print(f"KV cache: {kv_what} x 2 B = {m['kv_bytes_per_token_per_layer']:,} B per token per layer, "
                  f"x {m['num_layers']} layers = {m['kv_bytes_per_token']:,} B per token")
    table = Table(title=f"placements at {report['context']:,}-token context, "
                        f"{report['memory_utilization']:.0%} of GPU memory")
    for col in ("GPU", "TP", "weights/GPU", "act./GPU", "KV budget/GPU", "KV tokens", "seqs", "fits"):
        table.add_column(col, justify="left" if col in ("GPU", "fits") else "right")
    gpus = report["gpus"]
    for p in report["placements"]:
        name = gpus[p["gpu"]]["name"]
        if p.get("invalid"):
            table.add_row(name, str(p["tp"]), "", "", "", "", "", f"[dim]n/a: {p['why']}[/]")
            continue
        verdict = "[green]yes[/]" if p["fits"] else f"[red]no[/]: {p['why']}"
        table.add_row(name, str(p["tp"]), _gib(p["weights_per_gpu"]), _gib(p["activation_per_gpu"]),
                      _gib(p["kv_budget_per_gpu"]), f"{p['kv_tokens']:,}", str(p["max_seqs"]), verdict)
    console.print(table)
    console.print(f"host RAM {_gib(host['host_ram_bytes_min'])}-{_gib(host['host_ram_bytes_max'])} "
                  f"(1.5-3x the weights), NVMe >= {_gib(host['nvme_bytes'])} (served + staged checkpoint)")
    months = "never" if pay["months"] is None else f"{pay['months']:.1f} months"
    console.print(f"cost: cloud {pay['cloud_monthly']:,.0f}/month vs on-prem {pay['onprem_capex']:,.0f} once + "
                  f"{pay['onprem_monthly']:,.0f}/month"
                  + (f" + {pay['power_kw']:g} kW at {pay['power_price_per_kwh']:g}/kWh" if pay["power_kw"] else "")
                  + f": saves {pay['savings_monthly']:,.0f}/month, payback {months}")
