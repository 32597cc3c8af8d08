"""`deepfleet serve ENC_DIR`: the glue between an encrypted model directory and the engine. `model_source`
opens it with the configured key provider and yields a private RAM directory holding its config and tokenizer;
the loader (`models/loader.py`) asks `encrypted_model(dir)` for the shards of that directory, which stay
encrypted on disk and are decrypted in memory one at a time. Plain model directories pass through unchanged."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deepfleet.security.crypto import WeightCryptoError, read_cipher
from deepfleet.security.encrypted_model import EncryptedModel, is_encrypted_model
from deepfleet.security.errors import SecurityConfigError
from deepfleet.security.keys import WeightsSettings, data_key
from deepfleet.security.manifest import ManifestError

RAM_DIR = Path("/dev/shm")  # tmpfs: the decrypted config/tokenizer never reach a disk
_OPEN: dict[Path, EncryptedModel] = {}  # RAM directory -> the encrypted model it stands for (this process)


def open_encrypted(enc_dir: Path, weights: WeightsSettings) -> EncryptedModel:
    """Key from the provider, key checked on every file, manifest decrypted and matched (names and sizes).
    SecurityConfigError with the reason when anything is wrong: the server refuses to start."""
    first = next(iter(sorted(enc_dir.glob("*.dfenc"))))
    try:
        return EncryptedModel(enc_dir, data_key(weights, read_cipher(first)))
    except (WeightCryptoError, ManifestError) as e:
        raise SecurityConfigError(f"encrypted model {enc_dir}: refused: {e}") from None


def check_model_source(model: str, weights: WeightsSettings) -> None:
    """At server start, before the port opens: an encrypted model must open with the configured key."""
    if is_encrypted_model(Path(model)):
        open_encrypted(Path(model), weights)


@contextlib.contextmanager
def model_source(model: str, weights: WeightsSettings) -> Iterator[Path]:
    enc_dir = Path(model)
    if not is_encrypted_model(enc_dir):
        yield enc_dir
        return
    enc = open_encrypted(enc_dir, weights)
    ram = Path(tempfile.mkdtemp(prefix="deepfleet-model-", dir=RAM_DIR if RAM_DIR.is_dir() else None))
    try:
        for rel in enc.metadata_files():
            dst = ram / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(enc.read(rel))
        _OPEN[ram] = enc
        yield ram
    finally:
        _OPEN.pop(ram, None)
        shutil.rmtree(ram, ignore_errors=True)


def encrypted_model(model_dir: Path) -> EncryptedModel | None:
    return _OPEN.get(Path(model_dir))
