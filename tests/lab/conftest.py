"""The lab test fixture: one dedicated lab instance per test session, shared by every `lab` test.

It brings up its own instance (`pytest`, beside any lab left up by hand), runs playbooks/site.yml once,
yields a `Lab` handle, and at the end of the session takes the instance down and checks that nothing it
recorded is left. Set DEEPFLEET_LAB_PLAYBOOK=playbooks/X.yml to converge with one playbook instead (role
work in progress); DEEPFLEET_LAB_HOSTS to change the host count (default 2)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab import instance, teardown
from lab.config import REPO
from lab.converge import SITE, run_compliance, run_site, stream
from lab.state import Host, State

NAME = "pytest"


@dataclass
class Lab:
    state: State
    playbook: Path
    timings: dict[str, float] = field(default_factory=dict)
    last_output: str = ""  # of the latest site() run

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def inventory(self) -> str:
        return self.state.inventory

    @property
    def hosts(self) -> list[Host]:
        return self.state.hosts

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def ssh(self, host: str | Host, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run `command` as root on a lab host; returns the CompletedProcess (check .returncode yourself)."""
        return instance.ssh(self.state, self.host(host) if isinstance(host, str) else host, command, timeout)

    def ansible(self, *args: str) -> tuple[int, str]:
        """`ansible-playbook -i <lab inventory> ARGS...` from the repo root with the venv's tools: (rc, output)."""
        return stream(["ansible-playbook", "-i", self.inventory, *args], log=lambda _line: None)

    def site(self, *extra: str) -> tuple[int, dict[str, dict[str, int]], float]:
        """Run the converge playbook again: (rc, PLAY RECAP per host, seconds)."""
        lines: list[str] = []
        result = run_site(self.state, *extra, playbook=self.playbook, log=lines.append)
        self.last_output = "\n".join(lines)
        return result

    def compliance(self, *extra: str) -> tuple[int, str, float]:
        return run_compliance(self.inventory, *extra, log=lambda _line: None)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, a bridge, systemd-nspawn)")


@pytest.fixture(scope="session")
def lab() -> Lab:
    _need_root()
    playbook = REPO / os.environ.get("DEEPFLEET_LAB_PLAYBOOK", str(SITE.relative_to(REPO)))
    instance.down(NAME)  # leftovers of an interrupted session, as recorded
    t0 = time.monotonic()
    state = instance.up(NAME, hosts=int(os.environ.get("DEEPFLEET_LAB_HOSTS", "2")))
    handle = Lab(state=state, playbook=playbook, timings={"up": time.monotonic() - t0})
    try:
        rc, recap, seconds = handle.site()
        handle.timings["first converge"] = seconds
        # the end of the output names the failed task and its message (the recap alone does not)
        assert rc == 0, f"{playbook.name} failed on the fresh lab (exit {rc}): {recap}\n{handle.last_output[-6000:]}"
        yield handle
    finally:
        recorded = list(state.resources)
        t0 = time.monotonic()
        ok = instance.down(NAME)
        handle.timings["down"] = time.monotonic() - t0
        print("\nlab timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in handle.timings.items()))
        left = teardown.remaining(recorded)
        assert ok and not left, f"lab {NAME} teardown left: {left}"
