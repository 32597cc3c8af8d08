"""The record of one lab instance: every object `up` creates is appended (and saved) the moment it exists,
so `down` -- or the rollback of a failed `up` -- removes exactly that, newest first, and nothing else."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab import config
from lab.config import Names


@dataclass
class Host:
    name: str
    ip: str
    machine: str
    netns: str
    veth: str
    root: str


@dataclass
class State:
    name: str
    state_dir: str
    tag: str
    status: str = "creating"  # creating -> up
    subnet: str = ""
    bridge_ip: str = ""
    apt_port: int = 0
    store_port: int = 0  # the lab object store (lab/objectstore.py) on bridge_ip
    store_revision: str = ""  # the tiny model's revision in it
    key: str = ""
    inventory: str = ""
    hosts: list[Host] = field(default_factory=list)
    resources: list[dict] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / "state.json"

    @property
    def names(self) -> Names:
        return Names(self.tag)

    @property
    def apt_proxy(self) -> str:
        return f"http://{self.bridge_ip}:{self.apt_port}"

    def record(self, kind: str, **fields) -> dict:
        res = {"kind": kind, **fields}
        self.resources.append(res)
        self.save()
        return res

    def save(self) -> None:
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> State:
        data = json.loads(path.read_text())
        data["hosts"] = [Host(**h) for h in data.get("hosts", [])]
        return cls(**data)

    @classmethod
    def new(cls, name: str) -> State:
        state_dir = config.STATE_ROOT / name
        return cls(name=name, state_dir=str(state_dir), tag=Names.for_state_dir(state_dir).tag)


def state_dir(name: str) -> Path:
    return config.STATE_ROOT / name


def load(name: str) -> State | None:
    path = state_dir(name) / "state.json"
    return State.load(path) if path.exists() else None


def all_states() -> list[State]:
    return [State.load(p) for p in sorted(config.STATE_ROOT.glob("*/state.json"))]


def lock_path(name: str) -> Path:
    return config.STATE_ROOT / f".{name}.lock"


@contextmanager
def locked(path: Path):
    """An exclusive flock on `path` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
