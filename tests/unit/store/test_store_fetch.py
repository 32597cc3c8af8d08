"""`deepfleet weights fetch` / `sync` against a real S3-protocol server (moto, on loopback) with the real rclone:
verified installs, the site cache, resume after a SIGKILL, corruption, missing revisions, space, and the sync job."""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepfleet.security.manifest import MANIFEST_NAME, write_manifest
from deepfleet.store.fetch import CURRENT, FetchError, fetch
from deepfleet.store.rclone import Rclone, RcloneError

BUCKET = "deepfleet-models"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _rclone_conf(path: Path, remotes: dict[str, int]) -> Path:
    text = ""
    for name, port in remotes.items():
        text += (f"[{name}]\ntype = s3\nprovider = Other\naccess_key_id = lab\nsecret_access_key = lab-secret\n"
                 f"endpoint = http://127.0.0.1:{port}\nregion = us-east-1\n\n")
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two independent S3 servers ("two clouds": separate moto processes, separate state), each with the models
    bucket; an rclone config naming both."""
    ports, servers = [], []
    for _ in range(2):
        port = _free_port()
        servers.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ports.append(port)
    try:
        for port in ports:
            _wait_port(port)
        conf = _rclone_conf(tmp_path_factory.mktemp("rclone") / "rclone.conf", {"s3a": ports[0], "s3b": ports[1]})
        rc = Rclone(config=conf)
        rc.run("mkdir", f"s3a:{BUCKET}")
        rc.run("mkdir", f"s3b:{BUCKET}")
        yield rc
    finally:
        for server in servers:
            server.terminate()
            server.wait()


def _model(root: Path, seed: int, mib: float = 0.25) -> Path:
    """A model-shaped folder: config, two weight shards of random bytes, and its SHA256 manifest."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "seed": seed}))
    for i in range(2):
        (root / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(os.urandom(int(mib * 2**20)))
    write_manifest(root)
    return root


def _upload(rc: Rclone, local: Path, remote: str) -> None:
    rc.run("copy", str(local), remote)


@pytest.fixture
def origin(stores, tmp_path):
    """A model with revision r1 uploaded to store A; returns (origin path, local source folders by revision)."""
    name = f"m{time.monotonic_ns()}"
    src = {"r1": _model(tmp_path / "src" / "r1", 1)}
    _upload(stores, src["r1"], f"s3a:{BUCKET}/{name}/r1")
    return f"s3a:{BUCKET}/{name}", src, name


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fetch_installs_a_verified_revision_once(stores, origin, tmp_path):
    path, src, name = origin
    model_dir = tmp_path / "hot" / name
    first = fetch(stores, path, model_dir, "r1", log=lambda m: None)
    assert (first.source, first.changed) == ("origin", True)
    assert _files(model_dir / "r1") == _files(src["r1"])
    assert not any(p.name.startswith(".incoming") for p in model_dir.iterdir())
    assert not (model_dir / CURRENT).exists()  # flipping is the restart's job
    again = fetch(stores, path, model_dir, "r1", log=lambda m: None)
    assert (again.source, again.changed) == ("present", False)


def test_second_host_fetches_through_the_site_cache_without_the_store(stores, origin, tmp_path):
    path, src, name = origin
    cache_root = tmp_path / "warm" / "models"
    fetch(stores, path, cache_root / name, "r1", log=lambda m: None)  # the cache host fills its warm tier
    port = _free_port()
    server = subprocess.Popen(["rclone", "serve", "http", str(cache_root), "--addr", f"127.0.0.1:{port}",
                               "--read-only"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        # an origin no one answers on: the fetch can only succeed if it never goes there
        dead = Rclone(config=_rclone_conf(tmp_path / "dead.conf", {"s3a": _free_port()}), timeout_s=2)
        result = fetch(dead, path, tmp_path / "hot2" / name, "r1", cache=f"http://127.0.0.1:{port}",
                       log=lambda m: None)
    finally:
        server.terminate()
        server.wait()
    assert result.source == "cache"
    assert _files(tmp_path / "hot2" / name / "r1") == _files(src["r1"])


def test_fetch_killed_halfway_resumes_and_completes_verified(stores, origin, tmp_path):
    path, src, name = origin
    big = _model(tmp_path / "src" / "r2", 2, mib=1.5)
    _upload(stores, big, f"{path}/r2")
    model_dir = tmp_path / "hot" / name
    cmd = [sys.executable, "-c", "from deepfleet.cli import main; main()", "weights", "fetch", path, str(model_dir),
           "--revision", "r2", "--rclone-config", str(stores.config), "--bwlimit", "256k", "--transfers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    incoming = model_dir / ".incoming-r2"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(p.is_file() for p in incoming.rglob("*")):
        assert proc.poll() is None, "the fetch ended before it could be killed"
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the CLI and the rclone it runs
    proc.wait()
    assert incoming.is_dir() and not (model_dir / "r2").exists(), "the kill must leave a partial transfer"
    result = fetch(stores, path, model_dir, "r2", log=lambda m: None)
    assert result.source == "origin"
    assert _files(model_dir / "r2") == _files(big)


def test_object_corrupted_in_the_store_is_refused_and_current_stays(stores, origin, tmp_path):
    path, src, name = origin
    model_dir = tmp_path / "hot" / name
    fetch(stores, path, model_dir, "r1", log=lambda m: None)
    (model_dir / CURRENT).symlink_to("r1")
    bad = _model(tmp_path / "src" / "r2", 2)
    shard = bad / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, one bit pattern changed after the manifest was written
    shard.write_bytes(bytes(data))
    _upload(stores, bad, f"{path}/r2")
    with pytest.raises(FetchError, match=r"model-00002-of-00002.safetensors: sha256 mismatch"):
        fetch(stores, path, model_dir, "r2", log=lambda m: None)
    assert not (model_dir / "r2").exists()
    assert os.readlink(model_dir / CURRENT) == "r1"


def test_missing_revision_names_the_manifest_and_path(stores, origin, tmp_path):
    path, _, name = origin
    with pytest.raises(FetchError, match=rf"revision r9 not found: {path}/r9 has no {MANIFEST_NAME}"):
        fetch(stores, path, tmp_path / name, "r9", log=lambda m: None)


def test_unreachable_store_fails_with_the_origin_named(origin, tmp_path):
    path, _, name = origin
    dead = Rclone(config=_rclone_conf(tmp_path / "dead.conf", {"s3a": _free_port()}), timeout_s=2)
    with pytest.raises(FetchError, match=r"origin s3a:.*cannot list revision r1"):
        fetch(dead, path, tmp_path / name, "r1", log=lambda m: None)


def test_wrong_credentials_fail_naming_the_origin(tmp_path):
    """A store that checks signatures (moto with IAM auth on from the first request) refuses an unknown key pair."""
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        wrong = Rclone(config=_rclone_conf(tmp_path / "wrong.conf", {"s3a": port}), timeout_s=5)
        with pytest.raises(FetchError, match=r"origin s3a:deepfleet-models/m: cannot list revision r1: .*(403|denied|"
                                             r"InvalidAccessKeyId)"):
            fetch(wrong, f"s3a:{BUCKET}/m", tmp_path / "m", "r1", log=lambda m: None)
    finally:
        server.terminate()
        server.wait()
    assert not (tmp_path / "m" / "r1").exists()


def test_too_little_free_space_fails_before_the_transfer(stores, origin, tmp_path, monkeypatch):
    path, _, name = origin
    model_dir = tmp_path / "hot" / name
    real = shutil.disk_usage

    def tiny(p):
        u = real(p)
        return type(u)(u.total, u.total - 4096, 4096)

    monkeypatch.setattr("deepfleet.store.fetch.shutil.disk_usage", tiny)
    with pytest.raises(FetchError, match=r"0.00 GiB free, the revision needs"):
        fetch(stores, path, model_dir, "r1", log=lambda m: None)
    assert not (model_dir / ".incoming-r1").exists()


def test_prune_keeps_the_newest_and_never_the_served_revision(stores, origin, tmp_path):
    path, _, name = origin
    model_dir = tmp_path / "hot" / name
    fetch(stores, path, model_dir, "r1", log=lambda m: None)
    (model_dir / CURRENT).symlink_to("r1")
    for rev in ("r2", "r3"):
        _upload(stores, _model(tmp_path / "src" / rev, 3), f"{path}/{rev}")
        time.sleep(0.05)  # distinct folder times
        result = fetch(stores, path, model_dir, rev, keep=1, log=lambda m: None)
    assert result.pruned == ["r2"]  # r1 is served, r3 is newest
    assert sorted(p.name for p in model_dir.iterdir()) == [CURRENT, "r1", "r3"]


def test_switching_back_to_an_old_revision_never_prunes_it(stores, origin, tmp_path):
    """Served r3, r1 asked again (a rollback): r1 is the oldest but wanted, r3 is served: r2 goes."""
    path, _, name = origin
    model_dir = tmp_path / "hot" / name
    fetch(stores, path, model_dir, "r1", log=lambda m: None)
    for rev in ("r2", "r3"):
        _upload(stores, _model(tmp_path / "src" / rev, 3), f"{path}/{rev}")
        time.sleep(0.05)
        fetch(stores, path, model_dir, rev, keep=3, log=lambda m: None)
    (model_dir / CURRENT).symlink_to("r3")
    result = fetch(stores, path, model_dir, "r1", keep=2, log=lambda m: None)
    assert (result.source, result.pruned) == ("present", ["r2"])
    assert (model_dir / "r1" / MANIFEST_NAME).is_file()


def test_revision_is_given_to_the_group_before_it_appears(stores, origin, tmp_path):
    path, _, name = origin
    group = grp.getgrgid(os.getgid()).gr_name
    result = fetch(stores, path, tmp_path / name, "r1", group=group, log=lambda m: None)
    modes = {p.relative_to(result.path).as_posix(): (p.stat().st_mode & 0o777, p.stat().st_gid)
             for p in Path(result.path).rglob("*")}
    assert modes and set(modes.values()) == {(0o640, os.getgid())}
    assert Path(result.path).stat().st_mode & 0o777 == 0o750
    with pytest.raises(FetchError, match="group no-such-group: no such group"):
        fetch(stores, path, tmp_path / "other", "r1", group="no-such-group", log=lambda m: None)


def test_a_folder_without_manifest_is_not_taken_for_the_revision(stores, origin, tmp_path):
    path, _, name = origin
    (tmp_path / name / "r1").mkdir(parents=True)
    with pytest.raises(FetchError, match=f"r1 exists but holds no {MANIFEST_NAME}"):
        fetch(stores, path, tmp_path / name, "r1", log=lambda m: None)


def test_sync_copies_changed_and_deletes_removed_objects(stores, tmp_path):
    prefix = f"sync{time.monotonic_ns()}"
    a, b = f"s3a:{BUCKET}/{prefix}", f"s3b:{BUCKET}/{prefix}"
    local = _model(tmp_path / "r1", 1)
    _upload(stores, local, f"{a}/m/r1")
    first = stores.mirror(a, b, checksum=True)
    assert sorted(first.copied) == sorted(f"m/r1/{p}" for p in _files(local))
    (local / "config.json").write_text('{"changed": true}')
    _upload(stores, local, f"{a}/m/r1")
    stores.run("deletefile", f"{a}/m/r1/model-00001-of-00002.safetensors")
    second = stores.mirror(a, b, checksum=True)
    assert second.copied == ["m/r1/config.json"]
    assert second.deleted == ["m/r1/model-00001-of-00002.safetensors"]
    listed = {f.path for f in stores.list_files(b)}
    assert listed == {f"m/r1/{p}" for p in ("config.json", "model-00002-of-00002.safetensors", MANIFEST_NAME)}


def test_sync_to_an_unreachable_store_fails_naming_rclone(stores, tmp_path):
    dead = Rclone(config=_rclone_conf(tmp_path / "dead.conf", {"s3a": _free_port(), "s3b": _free_port()}),
                  timeout_s=2)
    with pytest.raises(RcloneError, match="rclone sync failed"):
        dead.mirror(f"s3a:{BUCKET}/x", f"s3b:{BUCKET}/x", checksum=True)
