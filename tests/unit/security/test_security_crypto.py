"""AES-256-GCM / SM4-GCM weight files: roundtrip, and refusal of wrong keys and every kind of tampering."""

import os
import stat

import pytest

from deepfleet.security.crypto import (
    CIPHERS,
    HEADER_SIZE,
    KEY_ENV,
    NONCE_SIZE,
    TAG_SIZE,
    WeightCryptoError,
    decrypt_dir,
    decrypt_file,
    decrypt_model,
    encrypt_dir,
    encrypt_file,
    generate_key,
    load_key,
    read_cipher,
)
from deepfleet.security.manifest import ManifestError, verify_manifest, write_manifest

CHUNK = 64
RECORD = NONCE_SIZE + TAG_SIZE + CHUNK
OFFSETS = [HEADER_SIZE + 3, HEADER_SIZE + RECORD + NONCE_SIZE + 1, HEADER_SIZE + 2 * RECORD + 40]


@pytest.fixture(params=sorted(CIPHERS))
def cipher(request):
    return request.param


def encrypted(tmp_path, cipher, data, name="model.safetensors"):
    src, enc = tmp_path / name, tmp_path / (name + ".dfenc")
    src.write_bytes(data)
    key = generate_key(cipher)
    encrypt_file(src, enc, key, cipher, name=name, chunk_size=CHUNK)
    return enc, key


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_roundtrip(tmp_path, cipher, size):
    data = os.urandom(size)
    enc, key = encrypted(tmp_path, cipher, data)
    assert read_cipher(enc) == cipher
    assert size < 16 or data[:16] not in enc.read_bytes()  # (a 1-byte plaintext may appear by chance)
    decrypt_file(enc, tmp_path / "out", key, name="model.safetensors")
    assert (tmp_path / "out").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o600


def assert_refused(tmp_path, enc, key, match, name="model.safetensors"):
    with pytest.raises(WeightCryptoError, match=match):
        decrypt_file(enc, tmp_path / "out", key, name=name)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_wrong_key(tmp_path, cipher):
    enc, _ = encrypted(tmp_path, cipher, os.urandom(300))
    assert_refused(tmp_path, enc, generate_key(cipher), "wrong key")


def test_key_of_the_other_cipher(tmp_path):
    enc, _ = encrypted(tmp_path, "sm4-gcm", b"weights")
    assert_refused(tmp_path, enc, generate_key("aes-256-gcm"), "encrypted with sm4-gcm, which needs a 16-byte key")


# a nonce byte of chunk 0, a tag byte of chunk 1, a ciphertext byte of chunk 2
@pytest.mark.parametrize("offset", OFFSETS)
def test_flipped_bit_in_nonce_tag_or_ciphertext(tmp_path, cipher, offset):
    enc, key = encrypted(tmp_path, cipher, os.urandom(300))
    data = bytearray(enc.read_bytes())
    data[offset] ^= 0x10
    enc.write_bytes(data)
    chunk = (offset - HEADER_SIZE) // RECORD
    assert_refused(tmp_path, enc, key, f"chunk {chunk} failed authentication")


def test_altered_header(tmp_path, cipher):
    enc, key = encrypted(tmp_path, cipher, os.urandom(300))
    data = bytearray(enc.read_bytes())
    data[10] ^= 0x01  # low byte of the chunk size
    enc.write_bytes(data)
    assert_refused(tmp_path, enc, key, "header was altered")


def test_not_an_encrypted_file(tmp_path):
    (tmp_path / "plain").write_bytes(b"PK\x03\x04 not ours")
    assert_refused(tmp_path, tmp_path / "plain", generate_key("aes-256-gcm"), "not a deepfleet encrypted")


@pytest.mark.parametrize("cut", ["last_record", "mid_record", "header_only", "inside_header"])
def test_truncation(tmp_path, cipher, cut):
    enc, key = encrypted(tmp_path, cipher, os.urandom(4 * CHUNK))
    data = enc.read_bytes()
    keep = {
        "last_record": len(data) - RECORD,
        "mid_record": len(data) - 10,
        "header_only": HEADER_SIZE,
        "inside_header": HEADER_SIZE - 1,
    }[cut]
    enc.write_bytes(data[:keep])
    assert_refused(tmp_path, enc, key, "truncated|failed authentication|not a deepfleet")


def test_appended_record(tmp_path, cipher):
    enc, key = encrypted(tmp_path, cipher, os.urandom(4 * CHUNK))
    data = enc.read_bytes()
    enc.write_bytes(data + data[HEADER_SIZE : HEADER_SIZE + RECORD])
    assert_refused(tmp_path, enc, key, "chunk 3 failed authentication")


def test_swapped_chunks(tmp_path, cipher):
    enc, key = encrypted(tmp_path, cipher, os.urandom(4 * CHUNK))
    data = enc.read_bytes()
    first, second = HEADER_SIZE, HEADER_SIZE + RECORD
    swapped = data[:first] + data[second : second + RECORD] + data[first:second] + data[second + RECORD :]
    enc.write_bytes(swapped)
    assert_refused(tmp_path, enc, key, "chunk 0 failed authentication")


def test_file_renamed_or_swapped_for_another_shard(tmp_path, cipher):
    enc, key = encrypted(tmp_path, cipher, os.urandom(100), name="model-00001.safetensors")
    assert_refused(tmp_path, enc, key, "chunk 0 failed authentication", name="model-00002.safetensors")


def test_directory_roundtrip_verifies_against_the_manifest(tmp_path, cipher):
    model = tmp_path / "model"
    (model / "nested").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "nested" / "model.safetensors").write_bytes(os.urandom(1000))
    write_manifest(model)
    key = generate_key(cipher)
    written = encrypt_dir(model, tmp_path / "enc", key, cipher, chunk_size=CHUNK)
    assert sorted(p.relative_to(tmp_path / "enc").as_posix() for p in written) == [
        "config.json.dfenc",
        "deepfleet-manifest.json.dfenc",
        "nested/model.safetensors.dfenc",
    ]
    decrypt_dir(tmp_path / "enc", tmp_path / "plain", key)
    verify_manifest(tmp_path / "plain")
    assert (tmp_path / "plain" / "nested" / "model.safetensors").read_bytes() == (
        model / "nested" / "model.safetensors"
    ).read_bytes()


def test_directory_refuses_foreign_files_and_output_inside_the_model(tmp_path):
    key = generate_key("aes-256-gcm")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "README.md").write_text("plaintext")
    with pytest.raises(WeightCryptoError, match=r"README\.md: not an encrypted weight file"):
        decrypt_dir(tmp_path / "enc", tmp_path / "out", key)
    with pytest.raises(WeightCryptoError, match="must not be inside the model directory"):
        encrypt_dir(tmp_path / "enc", tmp_path / "enc" / "out", key, "aes-256-gcm")


def test_keys_from_raw_file_hex_file_and_env(tmp_path, monkeypatch, cipher):
    key = generate_key(cipher)
    (tmp_path / "raw.key").write_bytes(key)
    (tmp_path / "hex.key").write_text(key.hex() + "\n")
    assert load_key(cipher, tmp_path / "raw.key") == key
    assert load_key(cipher, tmp_path / "hex.key") == key
    monkeypatch.setenv(KEY_ENV, key.hex())
    assert load_key(cipher) == key


def test_bad_keys_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(WeightCryptoError, match=f"none given.*{KEY_ENV}"):
        load_key("aes-256-gcm")
    (tmp_path / "short.key").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightCryptoError, match="short.key: neither a raw 32-byte aes-256-gcm key nor hex text"):
        load_key("aes-256-gcm", tmp_path / "short.key")
    monkeypatch.setenv(KEY_ENV, "00" * 16)
    with pytest.raises(WeightCryptoError, match=rf"\${KEY_ENV}: 16-byte key, aes-256-gcm needs 32"):
        load_key("aes-256-gcm")
    with pytest.raises(WeightCryptoError, match="cipher: unknown 'rot13'"):
        load_key("rot13")


def test_decrypt_model_reads_cipher_and_env_key_and_checks_the_manifest(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(500))
    write_manifest(model)
    key = generate_key("sm4-gcm")
    encrypt_dir(model, tmp_path / "enc", key, "sm4-gcm", chunk_size=CHUNK)
    monkeypatch.setenv(KEY_ENV, key.hex())
    written = decrypt_model(tmp_path / "enc", tmp_path / "ok")
    assert written == [tmp_path / "ok" / "deepfleet-manifest.json", tmp_path / "ok" / "model.safetensors"]
    # weights changed after the manifest was written, then encrypted: the chunks authenticate, the manifest catches it
    (model / "model.safetensors").write_bytes(os.urandom(500))
    encrypt_dir(model, tmp_path / "enc2", key, "sm4-gcm")
    with pytest.raises(ManifestError, match=r"model\.safetensors: sha256 mismatch"):
        decrypt_model(tmp_path / "enc2", tmp_path / "stale")
    with pytest.raises(WeightCryptoError, match=r"no \.dfenc files"):
        decrypt_model(model, tmp_path / "x")  # a plaintext model directory
