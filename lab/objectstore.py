"""The lab's object store: an S3-protocol server (moto's, from PyPI: no S3 server installs from Debian) bound to
the bridge address only, seeded with the tiny model as one revision, encrypted (`deepfleet weights encrypt` with
the lab's data key, lab/pki.py) with a SHA256 manifest over the ciphertext: no plaintext weight leaves the
controller, the hosts hold only ciphertext and serve it through their PKCS#11 token. The hosts fetch it
with the real role (model_store: rclone, site cache, verification) as real hosts fetch from S3, and a second bucket
stands for the other cloud of the sync job."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from lab import pki, system
from lab.config import LabError

BUCKET = "deepfleet-models"
MIRROR_BUCKET = "deepfleet-models-mirror"  # the "other cloud" of the lab's sync job
MODEL = "tiny-qwen2"  # roles/inference_runtime: inference_runtime_model_name
REMOTE = "lab-store"
# moto accepts any key pair; real inventories put theirs in vault-encrypted variables.
CREDENTIALS = {"access_key_id": "deepfleet-lab", "secret_access_key": "deepfleet-lab-secret"}
START_TIMEOUT_S = 30


def remote(state) -> dict:
    """The rclone remote of the lab store, as the hosts' model_store_remotes entry."""
    return {"type": "s3", "provider": "Other", "endpoint": f"http://{state.bridge_ip}:{state.store_port}",
            "region": "us-east-1", **CREDENTIALS}


def _rclone_config(state) -> Path:
    path = Path(state.state_dir) / "object-store" / "rclone.conf"
    lines = [f"[{REMOTE}]", *(f"{k} = {v}" for k, v in remote(state).items())]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def start(state, port_open) -> None:
    """moto's server on bridge_ip:store_port, in its own cgroup, recorded like the apt proxy."""
    workdir = Path(state.state_dir) / "object-store"
    workdir.mkdir(parents=True)
    cg = system.cgroup_create(state.names.cgroup("store"))
    state.record("cgroup", paths=cg)
    with open(workdir / "server.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", state.bridge_ip, "-p", str(state.store_port)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=system.cgroup_joiner(cg))
    state.record("process", role="object-store", **system.identity(proc.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open(state.bridge_ip, state.store_port, 0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (workdir / "server.log").read_text()[-600:]
            raise LabError(f"the lab object store did not start on {state.bridge_ip}:{state.store_port}: "
                           f"{tail.strip()}", "check that moto[server] is installed in the venv (make venv)")
        time.sleep(0.2)


def rclone(state):
    """The controller's rclone, with the lab store as remote REMOTE."""
    from deepfleet.store.rclone import Rclone

    return Rclone(config=_rclone_config(state))


def _deepfleet(*args: str) -> None:
    system.run([sys.executable, "-c", "from deepfleet.cli import main; main()", *args])


def publish(state, model_dir: Path, seed: int = 0) -> str:
    """Generate a tiny model into model_dir/plain with its manifest, encrypt it into model_dir/encrypted, write
    the manifest of the ciphertext and upload that as revision <its digest[:12]>, as a model publisher would;
    returns the revision."""
    from deepfleet.security.manifest import MANIFEST_NAME, sha256_file

    plain, encrypted = model_dir / "plain", model_dir / "encrypted"
    _deepfleet("make-tiny-model", str(plain), "--arch", "qwen2", "--seed", str(seed))
    _deepfleet("weights", "manifest", str(plain))
    _deepfleet("weights", "encrypt", str(plain), str(encrypted), "--key-file", str(pki.weights_key(state)))
    _deepfleet("weights", "manifest", str(encrypted))
    revision = sha256_file(encrypted / MANIFEST_NAME)[:12]
    rclone(state).run("copy", str(encrypted), f"{REMOTE}:{BUCKET}/{MODEL}/{revision}")
    return revision


def seed(state, log) -> None:
    """The store's buckets, and the tiny model as the lab's first revision."""
    for bucket in (BUCKET, MIRROR_BUCKET):
        rclone(state).run("mkdir", f"{REMOTE}:{bucket}")
    state.store_revision = publish(state, Path(state.state_dir) / "object-store" / "seed" / MODEL)
    state.save()
    log(f"==> lab {state.name}: object store {remote(state)['endpoint']} holds {MODEL} revision "
        f"{state.store_revision}")


def inventory_vars(state, cache_host: str) -> dict:
    """What the hosts need to fetch from the lab store through cache_host, and the lab's sync job."""
    return {
        "inference_runtime_model_source": "objectstore",
        "model_store_remotes": {REMOTE: remote(state)},
        "model_store_origin": f"{REMOTE}:{BUCKET}/{MODEL}",
        "model_store_revision": state.store_revision,
        "model_store_cache_host": cache_host,
        "model_store_sync_host": cache_host,
        "model_store_sync_jobs": [{"name": "lab-mirror", "src": f"{REMOTE}:{BUCKET}",
                                   "dst": f"{REMOTE}:{MIRROR_BUCKET}", "on_calendar": "daily"}],
    }


def reads(state, revision: str) -> Counter:
    """GETs of the revision's objects in the store's request log, per object: what the hosts took from the store
    itself rather than from the site cache."""
    log = (Path(state.state_dir) / "object-store" / "server.log").read_text()
    return Counter(re.findall(rf'"GET /{BUCKET}/{MODEL}/{revision}/(\S+) HTTP', log))
