"""Weight files encrypted at rest with AES-256-GCM or SM4-GCM (both through `cryptography`/OpenSSL).

File format (`<name>.dfenc`), all integers big-endian:
  header  magic "DFENC" | version u8 | cipher id u8 | chunk size u32 | key-check nonce (12) | key-check tag (16)
  records nonce (12) | tag (16) | ciphertext (chunk size bytes, the last record shorter)
Each record's associated data is header | chunk index u64 | final-flag u8 | file name, so records cannot be
reordered, swapped between files, dropped from the end or renamed without failing authentication. The key-check
tag (GCM over no plaintext) tells a wrong key apart from a damaged file. Files are streamed chunk by chunk
and written to `<dst>.partial`, renamed only once every chunk has authenticated.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import Cipher, CipherAlgorithm, algorithms, modes

from deepfleet.security.files import map_files, regular_files
from deepfleet.security.manifest import MANIFEST_NAME, verify_manifest

MAGIC = b"DFENC"
FORMAT_VERSION = 1
ENCRYPTED_SUFFIX = ".dfenc"
KEY_ENV = "DEEPFLEET_WEIGHTS_KEY"  # hex-encoded key, for when no key file is given (e.g. injected from Vault)
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_CHUNK_SIZE = 1 << 30
NONCE_SIZE, TAG_SIZE = 12, 16  # random 96-bit nonce per chunk: far below 2^32 chunks per key for any model
_PREFIX = struct.Struct(">5sBBI")  # magic, version, cipher id, chunk size
HEADER_SIZE = _PREFIX.size + NONCE_SIZE + TAG_SIZE  # prefix + key-check record (no ciphertext)
_CHUNK_AD = struct.Struct(">QB")
_KEY_CHECK_AD = b"deepfleet weights key check"


@dataclass(frozen=True)
class CipherSpec:
    name: str
    cipher_id: int
    key_size: int
    algorithm: Callable[[bytes], CipherAlgorithm]


CIPHERS = {
    spec.name: spec
    for spec in (
        CipherSpec("aes-256-gcm", 1, 32, algorithms.AES),
        CipherSpec("sm4-gcm", 2, 16, algorithms.SM4),
    )
}
_BY_ID = {spec.cipher_id: spec for spec in CIPHERS.values()}


class WeightCryptoError(Exception):
    """A weight file could not be encrypted or decrypted; the message names the file and the reason."""


def cipher_spec(name: str) -> CipherSpec:
    if name not in CIPHERS:
        raise WeightCryptoError(f"cipher: unknown {name!r}, expected one of {', '.join(CIPHERS)}")
    return CIPHERS[name]


def _gcm(spec: CipherSpec, key: bytes, nonce: bytes, tag: bytes | None = None):
    try:
        cipher = Cipher(spec.algorithm(key), modes.GCM(nonce, tag))
        return cipher.decryptor() if tag is not None else cipher.encryptor()
    except UnsupportedAlgorithm as e:
        raise WeightCryptoError(f"{spec.name}: not supported by this cryptography/OpenSSL build ({e})") from None


def _seal(spec: CipherSpec, key: bytes, data: bytes, ad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_SIZE)
    enc = _gcm(spec, key, nonce)
    enc.authenticate_additional_data(ad)
    ciphertext = enc.update(data) + enc.finalize()
    return nonce + enc.tag + ciphertext


def _open(spec: CipherSpec, key: bytes, record: bytes, ad: bytes) -> bytes:
    tag_end = NONCE_SIZE + TAG_SIZE
    dec = _gcm(spec, key, record[:NONCE_SIZE], record[NONCE_SIZE:tag_end])
    dec.authenticate_additional_data(ad)
    return dec.update(record[tag_end:]) + dec.finalize()  # finalize raises InvalidTag before the caller sees anything


def generate_key(cipher: str) -> bytes:
    return secrets.token_bytes(cipher_spec(cipher).key_size)


def load_key(cipher: str, key_file: str | Path | None = None) -> bytes:
    """The key from a file (raw bytes, or hex text) or else from $DEEPFLEET_WEIGHTS_KEY (hex). Keys never come
    from the command line, where they would sit in shell history and the process list."""
    spec = cipher_spec(cipher)
    if key_file is not None:
        source, raw = str(key_file), Path(key_file).read_bytes()
        if len(raw) != spec.key_size:
            raw = _from_hex(source, raw.decode("ascii", errors="replace").strip(), spec)
    elif os.environ.get(KEY_ENV):
        source, raw = f"${KEY_ENV}", _from_hex(f"${KEY_ENV}", os.environ[KEY_ENV].strip(), spec)
    else:
        raise WeightCryptoError(f"key: none given (pass a key file or set {KEY_ENV} to the hex key)")
    if len(raw) != spec.key_size:
        raise WeightCryptoError(f"{source}: {len(raw)}-byte key, {spec.name} needs {spec.key_size} bytes")
    return raw


def _from_hex(source: str, text: str, spec: CipherSpec) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise WeightCryptoError(
            f"{source}: neither a raw {spec.key_size}-byte {spec.name} key nor hex text (is it the other cipher's key?)"
        ) from None


def _header(spec: CipherSpec, key: bytes, chunk_size: int) -> bytes:
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, spec.cipher_id, chunk_size)
    return prefix + _seal(spec, key, b"", _KEY_CHECK_AD + prefix)


def _parse_header(src: Path, header: bytes) -> tuple[CipherSpec, int]:
    if len(header) < HEADER_SIZE or not header.startswith(MAGIC):
        raise WeightCryptoError(f"{src}: not a deepfleet encrypted weight file (bad magic or header)")
    _, version, cipher_id, chunk_size = _PREFIX.unpack_from(header)
    if version != FORMAT_VERSION:
        raise WeightCryptoError(f"{src}: format version {version}, this deepfleet reads version {FORMAT_VERSION}")
    if cipher_id not in _BY_ID:
        raise WeightCryptoError(f"{src}: unknown cipher id {cipher_id}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise WeightCryptoError(f"{src}: implausible chunk size {chunk_size}")
    return _BY_ID[cipher_id], chunk_size


def read_cipher(src: str | Path) -> str:
    """The cipher an encrypted file says it uses (unauthenticated until decrypted with the key)."""
    with open(src, "rb") as f:
        return _parse_header(Path(src), f.read(HEADER_SIZE))[0].name


def _read_header(src: Path, f, key: bytes) -> tuple[CipherSpec, bytes, int]:
    header = f.read(HEADER_SIZE)
    spec, chunk_size = _parse_header(src, header)
    if len(key) != spec.key_size:
        raise WeightCryptoError(f"{src}: encrypted with {spec.name}, which needs a {spec.key_size}-byte key")
    try:
        _open(spec, key, header[_PREFIX.size :], _KEY_CHECK_AD + header[: _PREFIX.size])
    except InvalidTag:
        raise WeightCryptoError(f"{src}: wrong key for this file ({spec.name}), or its header was altered") from None
    return spec, header, chunk_size


def key_matches(src: str | Path, key: bytes) -> bool:
    """Whether `key` opens src's key-check tag (a cheap check of the key before any bulk decryption)."""
    src = Path(src)
    with open(src, "rb") as f:
        try:
            _read_header(src, f, key)
        except WeightCryptoError as e:
            if "wrong key" in str(e) or "needs a" in str(e):
                return False
            raise
    return True


def _chunk_ad(header: bytes, index: int, final: bool, name: str) -> bytes:
    return header + _CHUNK_AD.pack(index, final) + name.encode()


class _AtomicWriter:
    """Writes to `<dst>.partial` and renames on success, so a failed run never leaves a plausible-looking file."""

    def __init__(self, dst: Path, mode: int):
        self.dst, self.tmp, self.mode = dst, dst.with_name(dst.name + ".partial"), mode

    def __enter__(self):
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.f = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.mode), "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.dst)
        else:
            self.tmp.unlink(missing_ok=True)


def encrypt_file(
    src: str | Path, dst: str | Path, key: bytes, cipher: str, name: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Encrypt src to dst; `name` (e.g. the path inside the model directory) is bound into every chunk."""
    spec, src, dst = cipher_spec(cipher), Path(src), Path(dst)
    if len(key) != spec.key_size:
        raise WeightCryptoError(f"key: {len(key)} bytes, {spec.name} needs {spec.key_size}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise WeightCryptoError(f"chunk_size: must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
    header = _header(spec, key, chunk_size)
    with open(src, "rb") as fin, _AtomicWriter(dst, 0o644) as fout:
        fout.write(header)
        chunk, index = fin.read(chunk_size), 0
        while True:
            # read one chunk ahead so the last record can carry the final flag (detects truncation)
            following = fin.read(chunk_size) if len(chunk) == chunk_size else b""
            final = not following
            fout.write(_seal(spec, key, chunk, _chunk_ad(header, index, final, name)))
            if final:
                return
            chunk, index = following, index + 1


def decrypted_chunks(src: str | Path, key: bytes, name: str) -> Iterator[bytes]:
    """The plaintext of src chunk by chunk, each authenticated before it is yielded (a consumer never sees a byte
    that failed its tag); `name` must be the one used to encrypt. WeightCryptoError names the file and the fault."""
    src = Path(src)
    with open(src, "rb") as fin:
        spec, header, chunk_size = _read_header(src, fin, key)
        record_size = NONCE_SIZE + TAG_SIZE + chunk_size
        record, index = fin.read(record_size), 0
        while True:
            if len(record) < NONCE_SIZE + TAG_SIZE:
                raise WeightCryptoError(f"{src}: truncated (chunk {index} is incomplete or missing)")
            following = fin.read(record_size) if len(record) == record_size else b""
            final = not following
            try:
                yield _open(spec, key, record, _chunk_ad(header, index, final, name))
            except InvalidTag:
                raise WeightCryptoError(
                    f"{src}: chunk {index} failed authentication (file tampered, truncated, reordered or renamed)"
                ) from None
            if final:
                return
            record, index = following, index + 1


def plaintext_size(src: str | Path) -> int:
    """The size the plaintext of src has (from the header and the file size; authenticated only on decryption)."""
    src = Path(src)
    with open(src, "rb") as f:
        _spec, chunk_size = _parse_header(src, f.read(HEADER_SIZE))
    body = src.stat().st_size - HEADER_SIZE
    records = max(1, -(-body // (NONCE_SIZE + TAG_SIZE + chunk_size)))
    return body - records * (NONCE_SIZE + TAG_SIZE)


def decrypt_file(src: str | Path, dst: str | Path, key: bytes, name: str) -> None:
    """Decrypt src to dst (mode 0600: it is plaintext weights) after checking every chunk; `name` must be the one
    used to encrypt. Raises WeightCryptoError naming the file and what is wrong."""
    with _AtomicWriter(Path(dst), 0o600) as fout:
        for chunk in decrypted_chunks(src, key, name):
            fout.write(chunk)


def encrypt_dir(
    model_dir: str | Path, out_dir: str | Path, key: bytes, cipher: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[Path]:
    """Encrypt every file of a model directory (manifest included) to out_dir/<path>.dfenc."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise WeightCryptoError(f"{model_dir}: not a directory")
    if out_dir.resolve().is_relative_to(model_dir.resolve()):
        raise WeightCryptoError(f"{out_dir}: must not be inside the model directory {model_dir}")

    def encrypt_one(path: Path) -> Path:
        rel = path.relative_to(model_dir).as_posix()
        dst = out_dir / (rel + ENCRYPTED_SUFFIX)
        encrypt_file(path, dst, key, cipher, name=rel, chunk_size=chunk_size)
        return dst

    return map_files(encrypt_one, regular_files(model_dir))


def decrypt_dir(enc_dir: str | Path, out_dir: str | Path, key: bytes) -> list[Path]:
    """Decrypt every <path>.dfenc of enc_dir to out_dir/<path> (e.g. a tmpfs the loader reads from). A file without
    the suffix is refused, before anything is written, rather than silently skipped."""
    enc_dir, out_dir = Path(enc_dir), Path(out_dir)
    if not enc_dir.is_dir():
        raise WeightCryptoError(f"{enc_dir}: not a directory")
    sources = regular_files(enc_dir)
    for path in sources:
        if not path.name.endswith(ENCRYPTED_SUFFIX):
            raise WeightCryptoError(f"{path}: not an encrypted weight file (no {ENCRYPTED_SUFFIX} suffix)")

    def decrypt_one(path: Path) -> Path:
        rel = path.relative_to(enc_dir).as_posix()[: -len(ENCRYPTED_SUFFIX)]
        decrypt_file(path, out_dir / rel, key, name=rel)
        return out_dir / rel

    return map_files(decrypt_one, sources)


def decrypt_model(enc_dir: str | Path, out_dir: str | Path, key_file: str | Path | None = None) -> list[Path]:
    """Decrypt an encrypted model directory for loading: the cipher comes from the files' headers, the key from
    key_file or $DEEPFLEET_WEIGHTS_KEY; a manifest encrypted along with the weights is then verified."""
    enc_dir, out_dir = Path(enc_dir), Path(out_dir)
    first = next(iter(sorted(enc_dir.rglob("*" + ENCRYPTED_SUFFIX))), None)
    if first is None:
        raise WeightCryptoError(f"{enc_dir}: no {ENCRYPTED_SUFFIX} files")
    written = decrypt_dir(enc_dir, out_dir, load_key(read_cipher(first), key_file))
    if (out_dir / MANIFEST_NAME).is_file():
        verify_manifest(out_dir)
    return written
