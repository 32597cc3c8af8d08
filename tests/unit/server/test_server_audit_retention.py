"""Audit log retention: rotation by logrotate (rename + create, or the file removed) while writers are busy loses
no line and splits none, and the runtime's own size cap (audit.max_bytes) bounds the log's files."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from deepfleet.security.errors import SecurityConfigError
from deepfleet.server.auth.audit import AuditLog
from deepfleet.server.config import ServeSettings

WRITERS = 4
EVENTS_PER_WRITER = 500


def _records(files: list[Path]) -> list[dict]:
    out = []
    for path in files:
        for line in path.read_text().splitlines(keepends=True):
            assert line.endswith("\n"), f"{path}: a line without its end: {line!r}"
            out.append(json.loads(line))  # a split or interleaved line does not parse
    return out


def _write_events(log: AuditLog, writer: int, pause_every: int = 50) -> None:
    for i in range(EVENTS_PER_WRITER):
        log.event("AUTH_FAILED", user=None, ip="127.0.0.1", reason="missing token", seq=f"{writer}-{i}")
        if i % pause_every == 0:
            time.sleep(0.001)  # let the rotator in between lines


def _logrotate_create(path: Path, generation: int) -> None:
    """What logrotate's `create 0640` does: rename the file away, then create an empty one with the mode. When a
    writer was quicker, logrotate moves that file aside and tries once more (then gives up with an error)."""
    os.rename(path, path.with_name(f"{path.name}.r{generation}"))
    for attempt in range(2):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
            return
        except FileExistsError:
            os.rename(path, path.with_name(f"{path.name}.r{generation}.backup{attempt}"))


@pytest.mark.parametrize("how", ["rename+create", "rename", "remove-after-copy"])
def test_rotation_under_concurrent_writers_loses_no_line(tmp_path, how):
    path = tmp_path / "audit" / "audit.jsonl"
    log = AuditLog(path)
    done = threading.Event()
    errors: list[BaseException] = []

    def rotator() -> None:
        generation = 0
        try:
            while not done.is_set():
                time.sleep(0.005)
                if not path.exists():
                    continue
                generation += 1
                rotated = path.with_name(f"{path.name}.r{generation}")
                if how == "rename+create":
                    _logrotate_create(path, generation)
                elif how == "rename":  # logrotate's `nocreate`: the runtime makes the new file
                    path.rename(rotated)
                else:  # keep the file by a hard link, then remove the name: no line may go to an unlinked inode
                    os.link(path, rotated)
                    os.unlink(path)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    writers = [threading.Thread(target=_write_events, args=(log, w)) for w in range(WRITERS)]
    rot = threading.Thread(target=rotator)
    rot.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    rot.join()
    log.event("SERVER_STARTED", seq="after")  # the file the rotator left (or removed) takes the next line
    log.close()

    assert not errors, errors
    files = sorted(path.parent.iterdir())
    assert len(files) > 3, "the rotator never ran between writes: the test proved nothing"
    seqs = [r["seq"] for r in _records(files)]
    expected = {f"{w}-{i}" for w in range(WRITERS) for i in range(EVENTS_PER_WRITER)} | {"after"}
    assert len(seqs) == len(expected) and set(seqs) == expected  # each line once, none lost
    # a line after the rotation is in the file the path names now, not in a rotated one
    assert [r["seq"] for r in _records([path])][-1:] == ["after"]
    assert path.stat().st_mode & 0o777 == 0o640


def test_removed_log_is_recreated_with_its_mode(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.event("SERVER_STARTED")
    path.unlink()
    log.event("MODEL_LOADED", model_id="m")
    assert [r["event"] for r in _records([path])] == ["MODEL_LOADED"]
    assert path.stat().st_mode & 0o777 == 0o640
    log.close()


def test_size_cap_rotates_and_keeps_the_newest(tmp_path):
    path = tmp_path / "audit.jsonl"
    max_bytes, backups = 4096, 3
    log = AuditLog(path, max_bytes=max_bytes, backups=backups)
    for i in range(400):  # ~130 bytes a line: ~52 KB, far more than (backups + 1) x 4 KB
        log.event("RATE_LIMITED", user=f"user-{i:04d}", ip="10.0.0.1", limit=100)
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    for f in files:
        assert 0 < f.stat().st_size <= max_bytes, f
        assert f.stat().st_mode & 0o777 == 0o640
    # oldest file first: the kept lines are the newest ones, in order, without a gap
    users = [r["user"] for r in _records([path.with_name(f"audit.jsonl.{i}") for i in (3, 2, 1)] + [path])]
    last = int(users[-1].split("-")[1])
    assert last == 399 and users == [f"user-{i:04d}" for i in range(last - len(users) + 1, last + 1)]


def test_size_cap_settings_and_bad_values(tmp_path):
    s = ServeSettings.model_validate({"model": "/m", "audit": {"path": str(tmp_path / "a"), "max_bytes": 1 << 20}})
    assert s.audit.max_bytes == 1 << 20 and s.audit.backups >= 1
    for bad in ({"max_bytes": 100}, {"backups": 0}, {"max_size": 5}):
        with pytest.raises(ValueError):
            ServeSettings.model_validate({"model": "/m", "audit": {"path": str(tmp_path / "a"), **bad}})
    with pytest.raises(SecurityConfigError, match="audit.backups"):
        AuditLog(tmp_path / "a", max_bytes=4096, backups=0)
