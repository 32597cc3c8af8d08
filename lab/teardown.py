"""Undo what a State recorded, newest first. Each undo is idempotent (safe to run on something already gone)
and touches only the recorded object: by name for kernel objects we created, by PID + start time for processes."""

from __future__ import annotations

import shutil
from pathlib import Path

from lab import disks, system
from lab.config import LabError
from lab.state import State


def undo_link(res: dict) -> None:  # bridge or veth (deleting the host end of a veth deletes its peer)
    if system.link_exists(res["name"]):
        system.run(["ip", "link", "del", res["name"]])


def undo_netns(res: dict) -> None:
    if system.netns_exists(res["name"]):
        system.run(["ip", "netns", "del", res["name"]])


def undo_run_netns_mount(res: dict) -> None:
    """`ip netns add` turns /run/netns into a mount point the first time; undo that only if we caused it and
    no other namespace lives there now."""
    path = Path(res["path"])
    if path.is_dir() and not any(path.iterdir()):
        if system.is_mount(path):
            system.run(["umount", str(path)], check=False)
        if res.get("created_dir") and not system.is_mount(path):
            path.rmdir()


def undo_nft(res: dict) -> None:
    if system.nft_table_exists(res["table"]):
        system.run(["nft", "delete", "table", "inet", res["table"]])


def undo_process(res: dict) -> None:
    system.terminate(res, timeout=res.get("grace", 10.0))


def undo_cgroup(res: dict) -> None:
    paths = [p for p in res["paths"] if Path(p).exists()]
    if not paths:
        return
    if system.cgroup_pids(paths):
        system.cgroup_kill(paths)
        if not system.wait_gone(lambda: not system.cgroup_pids(paths), 10):
            raise LabError(f"processes in {paths} survived SIGKILL: {sorted(system.cgroup_pids(paths))}")
    system.cgroup_remove(paths)


def undo_nspawn_runtime(res: dict) -> None:
    """systemd-nspawn leaves /run/systemd/nspawn/{propagate,unix-export}/MACHINE behind: ours have unique names."""
    for sub in ("propagate", "unix-export"):
        p = Path("/run/systemd/nspawn", sub, res["machine"])
        if p.is_dir() and not system.is_mount(p):
            shutil.rmtree(p, ignore_errors=True)


def undo_mount(res: dict) -> None:
    if res["path"] in system.mounts():
        system.run(["umount", res["path"]])


def undo_path(res: dict) -> None:
    p = Path(res["path"])
    if p.is_dir() and not p.is_symlink():
        # a host's root filesystem: make sure nothing is still mounted below it before deleting
        mounts = [m for m in system.mounts() if Path(m) == p or p in Path(m).parents]
        if mounts:
            raise LabError(f"refusing to delete {p}: still mounted below it: {mounts}")
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    if res.get("prune_empty_parent"):  # e.g. inventory/lab/NAME/ and inventory/lab/ once empty
        stop = Path(res["prune_empty_parent"])
        parent = p.parent
        while parent == stop or stop in parent.parents:
            if not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
            parent = parent.parent


UNDO = {
    "bridge": undo_link,
    "veth": undo_link,
    "netns": undo_netns,
    "run_netns_mount": undo_run_netns_mount,
    "nft": undo_nft,
    "process": undo_process,
    "cgroup": undo_cgroup,
    "nspawn_runtime": undo_nspawn_runtime,
    "mount": undo_mount,
    "path": undo_path,
    "loop": disks.undo_loop,
}


def teardown(state: State, log=print) -> list[str]:
    """Undo every recorded resource, newest first; keep going past errors and return them.
    A resource leaves the record only once it is gone, so a failed teardown can be re-run."""
    errors = []
    for res in list(reversed(state.resources)):
        try:
            UNDO[res["kind"]](res)
        except Exception as e:  # noqa: BLE001 - report and continue: the rest must still go
            msg = e.message if isinstance(e, LabError) else f"{type(e).__name__}: {e}"
            errors.append(f"{res['kind']} {_label(res)}: {msg}")
            continue
        state.resources.remove(res)
        state.save()
    if not errors:
        sd = Path(state.state_dir)
        state.path.unlink(missing_ok=True)
        shutil.rmtree(sd, ignore_errors=True)
    for e in errors:
        log(f"  could not remove {e}")
    return errors


def _label(res: dict) -> str:
    if res["kind"] == "loop":
        return f"{res.get('device') or '(not attached)'} ({res['file']})"
    return str(res.get("name") or res.get("path") or res.get("table") or res.get("machine") or res.get("pid") or "")


def remaining(resources: list[dict]) -> list[str]:
    """Which of these recorded objects still exist (used to prove a teardown complete)."""
    left = []
    for res in resources:
        kind = res["kind"]
        if kind in ("bridge", "veth"):
            gone = not system.link_exists(res["name"])
        elif kind == "netns":
            gone = not system.netns_exists(res["name"])
        elif kind == "process":
            gone = not system.alive(res)
        elif kind == "cgroup":
            gone = not any(Path(p).exists() for p in res["paths"])
        elif kind == "mount":
            gone = res["path"] not in system.mounts()
        elif kind == "nft":
            gone = not system.nft_table_exists(res["table"])
        elif kind == "nspawn_runtime":
            gone = not any(Path("/run/systemd/nspawn", sub, res["machine"]).exists()
                           for sub in ("propagate", "unix-export"))
        elif kind == "path":
            gone = not Path(res["path"]).exists()
        elif kind == "loop":
            gone = not disks.backed_by(res["file"])
        else:  # run_netns_mount: shared with other labs by nature, undone only when unused
            continue
        if not gone:
            left.append(f"{kind} {_label(res)}")
    return left
