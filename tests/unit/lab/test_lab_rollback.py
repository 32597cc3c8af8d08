"""A failed or interrupted `up` removes exactly what it had created, newest first; `down` is re-runnable."""

from __future__ import annotations

import pytest

from lab import config, instance, teardown
from lab.config import LabError
from lab.state import load


@pytest.fixture(autouse=True)
def private_state_root(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "STATE_ROOT", tmp_path / "state")
    return tmp_path / "state"


@pytest.fixture
def undone(monkeypatch):
    """Replace the real undo functions (root, kernel objects) by a recorder."""
    log: list[str] = []
    fail: set[str] = set()

    def fake(res):
        label = res.get("name") or res.get("path")
        if label in fail:
            raise LabError(f"cannot remove {label}")
        log.append(label)

    for kind in list(teardown.UNDO):
        if kind != "path":
            monkeypatch.setitem(teardown.UNDO, kind, fake)
    return log, fail


def _fake_create(fail_with):
    def create(state, n, apt_port, log):
        from pathlib import Path

        Path(state.state_dir).mkdir(parents=True)
        state.record("path", path=state.state_dir)
        state.record("bridge", name="br")
        state.record("netns", name="ns1")
        state.record("veth", name="v1")
        raise fail_with

    return create


@pytest.mark.parametrize("error", [LabError("boom"), KeyboardInterrupt()])
def test_failed_up_rolls_back_newest_first(error, monkeypatch, undone, private_state_root):
    log, _ = undone
    monkeypatch.setattr(instance, "preflight", lambda *a: None)
    monkeypatch.setattr(instance, "foreign_objects", lambda *a: [])
    monkeypatch.setattr(instance, "_create", _fake_create(error))
    with pytest.raises(type(error)):
        instance.up("t1", 2, log=lambda *_: None)
    assert log == ["v1", "ns1", "br"]
    assert load("t1") is None
    assert not (private_state_root / "t1").exists()


def test_teardown_keeps_what_it_could_not_remove_and_can_be_rerun(monkeypatch, undone, private_state_root):
    log, fail = undone
    monkeypatch.setattr(instance, "preflight", lambda *a: None)
    monkeypatch.setattr(instance, "foreign_objects", lambda *a: [])
    fail.add("ns1")
    monkeypatch.setattr(instance, "_create", _fake_create(LabError("boom")))
    with pytest.raises(LabError):
        instance.up("t2", 1, log=lambda *_: None)
    left = load("t2")
    assert left is not None and [r.get("name") for r in left.resources if r["kind"] == "netns"] == ["ns1"]
    assert log == ["v1", "br"]  # everything else went; the state dir stays because it holds the record

    fail.clear()
    monkeypatch.setattr(instance, "check_root", lambda: None)
    assert instance.down("t2", log=lambda *_: None)
    assert log == ["v1", "br", "ns1"]
    assert load("t2") is None


def test_foreign_objects_with_our_tag_are_not_adopted(monkeypatch, private_state_root):
    monkeypatch.setattr(instance, "preflight", lambda *a: None)
    monkeypatch.setattr(instance, "foreign_objects", lambda names, n: [f"bridge {names.bridge}"])
    created = []
    monkeypatch.setattr(instance, "_create", lambda *a: created.append(a))
    with pytest.raises(LabError, match="records none of it") as e:
        instance.up("t3", 1, log=lambda *_: None)
    assert "another --name" in e.value.fix
    assert created == [] and load("t3") is None


def test_down_of_unknown_lab_is_a_no_op(private_state_root):
    assert instance.down("never-made", log=lambda *_: None)
