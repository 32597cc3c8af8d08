"""`deepfleet doctor`: diagnose this node; exit 1 when any check fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deepfleet import defaults

_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def doctor(
    model: Annotated[Path | None, typer.Option(help="model directory (default: the first under the hot tier)")] = None,
    roles: Annotated[str | None, typer.Option(help="the repository's roles/ (version matrix); default: "
                                                   "$DEEPFLEET_ROLES_DIR or this checkout's")] = None,
    port: Annotated[int, typer.Option(help="the runtime's API port")] = defaults.API_PORT,
    require_gpu: Annotated[bool, typer.Option(help="fail (not warn) when there is no GPU")] = False,
    nccl_tests: Annotated[bool, typer.Option(help="run a short nccl-tests all_reduce when installed")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check GPUs, driver/CUDA against the roles' matrix, persistence, Fabric Manager, ECC, Xid, NCCL, weight
    checksums, storage tiers, permissions, free space, ports, clock sync and the runtime's health and readiness."""
    from rich.console import Console
    from rich.table import Table

    from deepfleet.doctor.diagnose import Options, diagnose, exit_code
    from deepfleet.doctor.result import summary

    checks = diagnose(Options(model, roles, port, require_gpu, nccl_tests))
    counts = summary(checks)
    if as_json:
        typer.echo(json.dumps({"checks": [c.as_dict() for c in checks], "summary": counts}, indent=2))
    else:
        table = Table(show_lines=False)
        for col in ("area", "check", "", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(c.area, c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail, c.fix)
        console = Console(width=180)
        console.print(table)
        failed = [f"{c.area}/{c.name}" for c in checks if c.status == "fail"]
        console.print(f"doctor: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail"
                      + (f" - failed: {', '.join(failed)}" if failed else ""))
    raise typer.Exit(exit_code(checks))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
