"""Configure a lab instance with playbooks/site.yml, check it with the compliance suite, print a summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lab.config import REPO, LabError, default_name
from lab.state import State, load

SITE = REPO / "playbooks" / "site.yml"
RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$")


def tool_env() -> dict:
    """ansible-playbook, ansible-inventory and testinfra's ansible:// backend must come from this venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    env.setdefault("ANSIBLE_NOCOLOR", "1")
    return env


def stream(cmd: list[str], log=print, **kw) -> tuple[int, str]:
    """Run `cmd`, echo its output as it comes, and return (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        log(line.rstrip("\n"))
    return proc.wait(), "".join(lines)


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """host -> {ok, changed, unreachable, failed, skipped, rescued, ignored} from the PLAY RECAP block."""
    recap: dict[str, dict[str, int]] = {}
    _, _, tail = output.rpartition("PLAY RECAP")
    for line in tail.splitlines():
        m = RECAP_LINE.match(line.strip())
        if m:
            recap[m["host"]] = {k: int(v) for k, v in (kv.split("=") for kv in m["counts"].split())}
    return recap


def changed_tasks(output: str) -> list[str]:
    """'TASK name: host' for every task result reported as changed in an ansible-playbook output."""
    out, task = [], ""
    for line in output.splitlines():
        m = re.match(r"^TASK \[(.*)\]", line)
        if m:
            task = m[1]
        m = re.match(r"^changed: \[([^\]]+)\]", line)
        if m:
            out.append(f"{task}: {m[1]}")
    return out


def run_site(state: State, *extra: str, playbook: Path = SITE, log=print) -> tuple[int, dict, float]:
    """ansible-playbook against the lab: (exit code, PLAY RECAP per host, seconds)."""
    t0 = time.monotonic()
    rc, out = stream(["ansible-playbook", "-i", state.inventory, str(playbook), *extra], log=log)
    return rc, parse_recap(out), time.monotonic() - t0


def run_compliance(inventory: str, *extra: str, log=print) -> tuple[int, str, float]:
    t0 = time.monotonic()
    rc, out = stream([sys.executable, "-m", "pytest", "tests/compliance", "--hosts=ansible://all",
                      f"--ansible-inventory={inventory}", "-q", "-rf", "-p", "no:cacheprovider", *extra], log=log)
    lines = out.strip().splitlines()
    last = next((ln for ln in reversed(lines) if ln.strip()), "").strip("= ")
    failed = [ln.split(" - ")[0] for ln in lines if ln.startswith("FAILED ")]
    return rc, "\n".join([last, *failed]), time.monotonic() - t0


def site_roles(site: Path = SITE) -> list[str]:
    """'playbook: role, role (hosts)' for each play imported by site.yml, read from the playbooks themselves."""
    out = []
    for entry in yaml.safe_load(site.read_text()) or []:
        book = entry.get("import_playbook") or entry.get("ansible.builtin.import_playbook")
        if not book:
            continue
        for play in yaml.safe_load((site.parent / book).read_text()) or []:
            roles = [r["role"] if isinstance(r, dict) else r for r in play.get("roles", [])]
            out.append(f"{book}: {', '.join(roles) or '(tasks)'} on {play.get('hosts')}")
    return out


def converge(name: str | None = None, log=print) -> int:
    name = name or default_name()
    state = load(name)
    if state is None or state.status != "up":
        raise LabError(f"lab {name} is not up", f"bring it up first: `python -m lab up --name {name}` (or `make lab`)")
    log(f"==> lab {name}: ansible-playbook -i {state.inventory} playbooks/site.yml")
    rc_site, recap, t_site = run_site(state, log=log)
    rc_comp, comp_line, t_comp = (1, "not run (site.yml failed)", 0.0)
    if rc_site == 0:
        log(f"==> lab {name}: compliance suite (tests/compliance)")
        rc_comp, comp_line, t_comp = run_compliance(state.inventory, log=log)

    totals = {k: sum(h.get(k, 0) for h in recap.values()) for k in ("ok", "changed", "failed", "unreachable")}
    groups = yaml.safe_load(Path(state.inventory).read_text())["all"]["children"]
    log("")
    log(f"==> lab {name}: summary")
    for h in state.hosts:
        member = [g for g, v in groups.items() if h.name in (v.get("hosts") or {})]
        log(f"  host        {h.name:6} {h.ip:13} groups: {', '.join(member)}")
    for line in site_roles():
        log(f"  configured  {line}")
    log(f"  site.yml    {'ok' if rc_site == 0 else f'FAILED (exit {rc_site})'}: "
        + " ".join(f"{k}={v}" for k, v in totals.items()) + f" across {len(recap)} hosts in {t_site:.0f} s")
    comp_head, *comp_failed = comp_line.splitlines() or [""]
    log(f"  compliance  {'passed' if rc_comp == 0 else 'FAILED'}: {comp_head} ({t_comp:.0f} s)")
    for line in comp_failed:
        log(f"              {line}")
    log(f"  inventory   {state.inventory}")
    log(f"  next        ssh -i {state.key} root@{state.hosts[0].ip}   |   make lab-status   |   make test   "
        "|   make lab-down")
    return 0 if rc_site == 0 and rc_comp == 0 else 1
