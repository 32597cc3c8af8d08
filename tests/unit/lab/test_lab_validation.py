"""Bad input to the lab is refused with a message naming the problem and the fix, before anything is made."""

from __future__ import annotations

import socket

import pytest

from lab import cli, config, state
from lab.config import BadInput, LabError


@pytest.fixture(autouse=True)
def private_state_root(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "STATE_ROOT", tmp_path / "state")
    return tmp_path / "state"


@pytest.mark.parametrize("n", [0, -1, config.MAX_HOSTS + 1, 100])
def test_invalid_host_count(n):
    with pytest.raises(BadInput) as e:
        config.validate_hosts(n)
    assert f"invalid host count {n}" in e.value.message and "--hosts" in e.value.fix and e.value.code == 2


@pytest.mark.parametrize("n", [config.MIN_HOSTS, config.DEFAULT_HOSTS, config.MAX_HOSTS])
def test_valid_host_count(n):
    assert config.validate_hosts(n) == n


@pytest.mark.parametrize("name", ["", "Lab", "1lab", "lab_1", "lab 1", "x" * 33, "../etc"])
def test_invalid_name(name):
    with pytest.raises(BadInput, match="invalid lab name"):
        config.validate_name(name)


def test_port_clash_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BadInput) as e:
            config.validate_port(port)
    assert f"port clash: port {port}" in e.value.message and "--apt-port" in e.value.fix


@pytest.mark.parametrize("port", [0, 80, 70000])
def test_port_out_of_range(port):
    with pytest.raises(BadInput, match="invalid apt proxy port"):
        config.validate_port(port)


def test_missing_dependency_names_package_and_make_deps():
    with pytest.raises(LabError) as e:
        config.check_tools(which=lambda cmd: None if cmd in ("debootstrap", "systemd-nspawn") else "/usr/bin/x")
    assert "debootstrap (package debootstrap)" in e.value.message
    assert "systemd-nspawn (package systemd-container)" in e.value.message
    assert "make deps" in e.value.fix


def test_kernel_without_overlayfs():
    with pytest.raises(LabError, match="no overlay filesystem"):
        config.check_kernel("nodev\ttmpfs\n\text4\n")
    config.check_kernel("nodev\ttmpfs\nnodev\toverlay\n")


def test_not_root():
    with pytest.raises(LabError, match="needs root") as e:
        config.check_root(euid=1000)
    assert "sudo" in e.value.fix


def test_interface_names_fit_the_kernel_limit(tmp_path):
    names = config.Names.for_state_dir(tmp_path / "a-very-long-lab-instance-name-indeed")
    for ifname in [names.bridge, names.veth(config.MAX_HOSTS), names.veth_peer(config.MAX_HOSTS)]:
        assert len(ifname) <= config.IFNAMSIZ, ifname
    other = config.Names.for_state_dir(tmp_path / "other")
    assert names.bridge != other.bridge, "two instances must never share a bridge name"


def test_default_name_differs_per_checkout(tmp_path):
    assert config.default_name(tmp_path / "a") != config.default_name(tmp_path / "b")
    config.validate_name(config.default_name(tmp_path / "a"))


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["up", "--hosts", "0"], "invalid host count 0"),
        (["up", "--hosts", "9"], "invalid host count 9"),
        (["up", "--name", "Bad_Name"], "invalid lab name"),
    ],
)
def test_cli_bad_input_exits_2_and_creates_nothing(argv, expect, capsys, private_state_root):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {expect}" in err and "fix:" in err
    assert not private_state_root.exists() or not any(private_state_root.iterdir())
    assert state.all_states() == []


def test_cli_not_root_exits_1_and_creates_nothing(capsys, monkeypatch, private_state_root):
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    assert cli.main(["up", "--name", "nonroot"]) == 1
    assert "needs root" in capsys.readouterr().err
    assert state.load("nonroot") is None


def test_cli_converge_without_lab(capsys):
    assert cli.main(["converge", "--name", "nothing-here"]) == 1
    err = capsys.readouterr().err
    assert "lab nothing-here is not up" in err and "python -m lab up" in err
