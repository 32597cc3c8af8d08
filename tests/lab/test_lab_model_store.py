"""The model from the lab's object store (lab/objectstore.py, role model_store): every runtime host serves the
seeded revision, encrypted: no file on any host holds a plaintext weight shard; the store was read once, by the
site cache, and the other host fetched from the cache; the sync job mirrors the store into the second bucket."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deepfleet.security.manifest import sha256_file
from lab import objectstore

pytestmark = pytest.mark.lab

MODEL_ROOT = f"/models/{objectstore.MODEL}"  # roles/inference_runtime: inference_runtime_model_root


def store_objects(lab, bucket: str, prefix: str) -> set[str]:
    return {f.path for f in objectstore.rclone(lab.state).list_files(f"{objectstore.REMOTE}:{bucket}/{prefix}")}


def test_each_runtime_host_serves_the_seeded_revision(lab):
    for host in lab.hosts:
        link = lab.ssh(host, f"readlink {MODEL_ROOT}/current").stdout.strip()
        assert link == lab.state.store_revision, host.name


def test_the_store_was_read_once_the_cache_served_the_other_host(lab):
    revision = lab.state.store_revision
    objects = store_objects(lab, objectstore.BUCKET, f"{objectstore.MODEL}/{revision}")
    assert "deepfleet-manifest.json" in objects and "config.json.dfenc" in objects and "config.json" not in objects
    reads = objectstore.reads(lab.state, revision)
    assert set(reads) == objects, f"objects never or wrongly read from the store: {reads} vs {objects}"
    assert set(reads.values()) == {1}, f"the store was read more than once per object: {reads}"


def test_no_host_file_is_a_plaintext_weight_shard(lab):
    """Every file on every host (model tiers, caches, /dev/shm, /tmp...) with the size of a plaintext shard of the
    served model is hashed: none is that shard. The plaintext exists only on the controller that encrypted it."""
    plain = Path(lab.state.state_dir) / "object-store" / "seed" / objectstore.MODEL / "plain"
    shards = {sha256_file(p): p.stat().st_size for p in plain.glob("*.safetensors")}
    assert shards, f"no plaintext shard in {plain}"
    for host in lab.hosts:
        for digest, size in shards.items():
            found = lab.ssh(host, f"find / \\( -path /proc -o -path /sys \\) -prune -o -type f -size {size}c "
                                  "-print0 | xargs -0 -r sha256sum").stdout
            assert digest not in found, f"{host.name} holds the plaintext shard: {found}"
        served = lab.ssh(host, f"find -L {MODEL_ROOT}/current/ -type f -name '*.safetensors.dfenc'").stdout.split()
        assert served, f"{host.name} serves no encrypted shard"


def test_sync_job_mirrors_the_store(lab):
    host = lab.hosts[0]  # model_store_sync_host in the lab inventory
    run = lab.ssh(host, "systemctl start deepfleet-model-sync-lab-mirror.service")
    assert run.returncode == 0, run.stderr
    assert store_objects(lab, objectstore.MIRROR_BUCKET, "") == store_objects(lab, objectstore.BUCKET, "")
    report = lab.ssh(host, "journalctl -u deepfleet-model-sync-lab-mirror.service -o cat --no-pager").stdout
    assert re.search(r"-> lab-store:deepfleet-models-mirror: \d+ copied, 0 deleted", report), report
