"""Serving an encrypted model directory (`deepfleet weights encrypt` output) without a plaintext copy on disk.

The directory holds only .dfenc files, and optionally a plaintext manifest of those ciphertext files (`deepfleet
weights manifest ENC_DIR`, what an object store revision carries for its transfer check; the encrypted manifest
inside is the one that authenticates the weights). Before any weight is used: the data key is checked against
every file's key-check tag, the encrypted manifest is decrypted and the set of files and their plaintext sizes
are compared with it. Each weight shard is then decrypted into one buffer in memory, chunk by chunk (each chunk
authenticated), hashed on the way and compared with the manifest's SHA256 before its tensors are handed out as
views of that buffer (`torch.frombuffer`), so a shard costs one plaintext copy in RAM while it is loaded and is
freed after. The small non-weight files (config.json, tokenizer files) are decrypted into a private RAM directory
(mode 0700 on /dev/shm) that the engine reads at start-up and that is removed once the engine is built.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from deepfleet.security.crypto import (
    ENCRYPTED_SUFFIX,
    WeightCryptoError,
    decrypted_chunks,
    key_matches,
    plaintext_size,
    read_cipher,
)
from deepfleet.security.files import regular_files
from deepfleet.security.manifest import MANIFEST_NAME, ManifestError

WEIGHT_SUFFIX = ".safetensors"


def is_encrypted_model(model_dir: Path) -> bool:
    return model_dir.is_dir() and any(model_dir.glob("*" + ENCRYPTED_SUFFIX))


class EncryptedModel:
    """An encrypted model directory opened with its key; every check that needs no bulk decryption is done here."""

    def __init__(self, enc_dir: Path, key: bytes) -> None:
        self.dir, self.key = Path(enc_dir), key
        self.files: dict[str, Path] = {}
        for path in regular_files(self.dir):
            rel = path.relative_to(self.dir).as_posix()
            if rel == MANIFEST_NAME:  # the transfer manifest over the ciphertext (model store revisions)
                continue
            if not rel.endswith(ENCRYPTED_SUFFIX):
                raise WeightCryptoError(f"{path}: not an encrypted weight file (no {ENCRYPTED_SUFFIX} suffix)")
            self.files[rel[: -len(ENCRYPTED_SUFFIX)]] = path
        for path in self.files.values():
            if not key_matches(path, key):
                raise WeightCryptoError(f"{path}: wrong key for this file ({read_cipher(path)}), or its header "
                                        "was altered")
        self.manifest = self._manifest()

    @property
    def cipher(self) -> str:
        return read_cipher(next(iter(self.files.values())))

    def _manifest(self) -> dict[str, dict[str, Any]]:
        if MANIFEST_NAME not in self.files:
            raise ManifestError(self.dir, [f"{MANIFEST_NAME}{ENCRYPTED_SUFFIX}: missing (an encrypted model must "
                                           "carry its manifest: `deepfleet weights manifest` before `encrypt`)"])
        try:
            files = json.loads(self.read(MANIFEST_NAME, verify=False))["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(self.dir, [f"{MANIFEST_NAME}: unreadable ({e})"]) from None
        present = set(self.files) - {MANIFEST_NAME}
        problems = [f"{rel}: missing" for rel in sorted(files.keys() - present)]
        problems += [f"{rel}: unexpected (not in the manifest)" for rel in sorted(present - files.keys())]
        for rel in sorted(files.keys() & present):
            size = plaintext_size(self.files[rel])
            if size != files[rel]["size"]:
                problems.append(f"{rel}: size {size} != {files[rel]['size']} in the manifest")
        if problems:
            raise ManifestError(self.dir, problems)
        return files

    def read(self, rel: str, verify: bool = True) -> bytearray:
        """The authenticated plaintext of one file, in memory; with `verify`, its SHA256 is the manifest's."""
        path = self.files[rel]
        buf, digest, at = bytearray(plaintext_size(path)), hashlib.sha256(), 0
        for chunk in decrypted_chunks(path, self.key, rel):
            buf[at : at + len(chunk)] = chunk
            digest.update(chunk)
            at += len(chunk)
        if verify and digest.hexdigest() != self.manifest[rel]["sha256"]:
            raise ManifestError(self.dir, [f"{rel}: sha256 mismatch (file changed since the manifest was written)"])
        return buf

    def metadata_files(self) -> list[str]:
        """What the engine reads by path (config, tokenizer): everything but weights and the manifest."""
        return [rel for rel in self.files if not rel.endswith(WEIGHT_SUFFIX) and rel != MANIFEST_NAME]

    def weight_files(self) -> list[str]:
        return sorted(rel for rel in self.files if rel.endswith(WEIGHT_SUFFIX) and "/" not in rel)

    def open_weights(self, rel: str) -> SafetensorsBuffer:
        return SafetensorsBuffer(rel, self.read(rel))


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class SafetensorsBuffer:
    """The safetensors format read from a buffer in memory, with safe_open's interface (keys, get_tensor, with)."""

    def __init__(self, name: str, buf: bytearray) -> None:
        self.name, self.buf = name, buf
        if len(buf) < 8:
            raise ValueError(f"{name}: not a safetensors file (shorter than its header length)")
        (header_len,) = struct.unpack_from("<Q", buf)
        if 8 + header_len > len(buf):
            raise ValueError(f"{name}: safetensors header length {header_len} beyond the file")
        try:
            header = json.loads(bytes(buf[8 : 8 + header_len]))
        except ValueError as e:
            raise ValueError(f"{name}: safetensors header is not JSON ({e})") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.base = 8 + header_len

    def __enter__(self) -> SafetensorsBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.buf = bytearray()  # drop the plaintext as soon as the shard is loaded

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_slice(self, key: str) -> _Slice:
        """safe_open's lazy slice (tensor-parallel loading): a rank indexes out its part of the view."""
        return _Slice(self.get_tensor(key))

    def get_tensor(self, key: str) -> Any:
        import torch

        entry = self.entries[key]
        try:
            dtype = getattr(torch, _DTYPES[entry["dtype"]])
            start, end = entry["data_offsets"]
            shape = list(entry["shape"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{self.name}: tensor {key}: bad header entry ({e!r})") from None
        count = 1
        for dim in shape:
            count *= dim
        if end - start != count * torch.empty((), dtype=dtype).element_size() or self.base + end > len(self.buf):
            raise ValueError(f"{self.name}: tensor {key}: data_offsets do not match its shape and dtype")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.buf, dtype=dtype, count=count, offset=self.base + start).view(shape)


class _Slice:
    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, where: Any) -> Any:
        return self.tensor[where]
