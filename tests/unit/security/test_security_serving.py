"""Serving an encrypted model directory: the engine built from ENC_DIR holds exactly the plain model's weights and
generates the same tokens, no plaintext weight is written anywhere, and a tampered chunk, a wrong key or a
manifest mismatch refuses the model with the reason (before a weight is used where it can be known before)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.models.tiny import make_tiny_model
from deepfleet.security import serving
from deepfleet.security.crypto import HEADER_SIZE, KEY_ENV, NONCE_SIZE, TAG_SIZE, encrypt_dir, generate_key
from deepfleet.security.errors import SecurityConfigError
from deepfleet.security.manifest import write_manifest
from deepfleet.server.app import build_engine
from deepfleet.server.config import ServeSettings


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("plain") / "tiny", arch="qwen2", seed=3)
    write_manifest(model)
    return model


@pytest.fixture(scope="module", params=["aes-256-gcm", "sm4-gcm"])
def encrypted(request, plain, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    key = generate_key(request.param)
    (root / "key").write_bytes(key)
    encrypt_dir(plain, root / "enc", key, request.param, chunk_size=64 << 10)
    return root / "enc", root / "key"


def engine_for(model_dir, **weights):
    return build_engine(ServeSettings(model=str(model_dir), weights=weights, engine={"device": "cpu"}))


def greedy(engine, prompt=(1, 2, 3, 4, 5)) -> list[int]:
    engine.add_request("r", list(prompt), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        outputs = engine.step()
    return list(outputs[-1].outputs[0].token_ids)


def test_encrypted_model_serves_the_same_weights_and_tokens(plain, encrypted, monkeypatch):
    enc_dir, key_file = encrypted
    written = []
    real_open = os.open

    def watch_open(path, flags, *args, **kwargs):  # every file the load creates
        if flags & os.O_CREAT:
            written.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch_open)
    engine = engine_for(enc_dir, key_file=str(key_file))
    monkeypatch.undo()
    reference = engine_for(plain)
    enc_params = dict(engine.runner.model.named_parameters())
    for name, p in reference.runner.model.named_parameters():
        assert torch.equal(p, enc_params[name]), name
    assert greedy(engine) == greedy(reference)
    # only config/tokenizer files were written, all into the RAM directory, which is gone again
    assert written and all(w.startswith(str(serving.RAM_DIR)) and not w.endswith(".safetensors") for w in written)
    assert not any(os.path.exists(w) for w in written)
    assert all(p.name.endswith(".dfenc") for p in enc_dir.iterdir())


def test_key_from_the_environment(encrypted, monkeypatch):
    enc_dir, key_file = encrypted
    monkeypatch.setenv(KEY_ENV, key_file.read_bytes().hex())
    serving.check_model_source(str(enc_dir), ServeSettings(model="m", weights={"key_provider": "env"}).weights)


def _copy(enc_dir, tmp_path):
    dst = tmp_path / "enc"
    shutil.copytree(enc_dir, dst)
    return dst


def test_tampered_ciphertext_is_refused_naming_file_and_chunk(encrypted, tmp_path):
    enc_dir, key_file = encrypted
    enc = _copy(enc_dir, tmp_path)
    shard = enc / "model.safetensors.dfenc"
    data = bytearray(shard.read_bytes())
    data[HEADER_SIZE + (NONCE_SIZE + TAG_SIZE + (64 << 10)) + NONCE_SIZE + TAG_SIZE + 7] ^= 1  # chunk 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors.dfenc: chunk 1 failed authentication"):
        engine_for(enc, key_file=str(key_file))


def test_wrong_key_is_refused_before_loading(encrypted, tmp_path):
    enc_dir, key_file = encrypted
    (tmp_path / "wrong").write_bytes(generate_key("aes-256-gcm" if len(key_file.read_bytes()) == 32 else "sm4-gcm"))
    weights = ServeSettings(model="m", weights={"key_file": str(tmp_path / "wrong")}).weights
    with pytest.raises(SecurityConfigError, match=r"refused: .*\.dfenc: wrong key"):
        serving.check_model_source(str(enc_dir), weights)


def test_manifest_mismatch_is_refused(plain, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(plain, model)
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text() + " ")  # resized
    key = generate_key("aes-256-gcm")
    (tmp_path / "key").write_bytes(key)
    encrypt_dir(model, tmp_path / "enc", key, "aes-256-gcm")
    with pytest.raises(SecurityConfigError, match=r"tokenizer_config.json: size \d+ != \d+ in the manifest"):
        serving.check_model_source(str(tmp_path / "enc"), ServeSettings(model="m", weights={
            "key_file": str(tmp_path / "key")}).weights)


def test_changed_weights_same_size_fail_the_sha256_before_use(plain, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(plain, model)
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55  # a weight byte: same size, different content
    shard.write_bytes(bytes(data))
    key = generate_key("aes-256-gcm")
    (tmp_path / "key").write_bytes(key)
    encrypt_dir(model, tmp_path / "enc", key, "aes-256-gcm")
    with pytest.raises(ValueError, match=r"model.safetensors: sha256 mismatch"):
        engine_for(tmp_path / "enc", key_file=str(tmp_path / "key"))


def test_an_encrypted_model_without_its_manifest_is_refused(plain, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(plain, model)
    (model / "deepfleet-manifest.json").unlink()
    key = generate_key("aes-256-gcm")
    (tmp_path / "key").write_bytes(key)
    encrypt_dir(model, tmp_path / "enc", key, "aes-256-gcm")
    with pytest.raises(SecurityConfigError, match="deepfleet-manifest.json.dfenc: missing"):
        serving.check_model_source(str(tmp_path / "enc"), ServeSettings(model="m", weights={
            "key_file": str(tmp_path / "key")}).weights)


def test_a_model_store_revision_ciphertext_and_its_transfer_manifest_serves(plain, encrypted, tmp_path):
    """What an object store revision of an encrypted model holds: the .dfenc files and a plaintext manifest over
    them (checked by `deepfleet weights fetch`); served as is. Any other plaintext file is refused."""
    enc_dir, key_file = encrypted
    revision = _copy(enc_dir, tmp_path)
    write_manifest(revision)
    assert sorted(p.name for p in revision.iterdir() if not p.name.endswith(".dfenc")) == ["deepfleet-manifest.json"]
    engine = engine_for(revision, key_file=str(key_file))
    assert greedy(engine) == greedy(engine_for(plain))
    (revision / "config.json").write_text("{}")  # a plaintext file beside the ciphertext
    with pytest.raises(SecurityConfigError, match=r"config\.json: not an encrypted weight file"):
        serving.check_model_source(str(revision), ServeSettings(model="m", weights={"key_file": str(key_file)}).weights)


def test_missing_key_sources_name_the_setting(encrypted, monkeypatch):
    enc_dir, _ = encrypted
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(SecurityConfigError, match=rf"\${KEY_ENV} is not set"):
        serving.check_model_source(str(enc_dir), ServeSettings(model="m").weights)
    with pytest.raises(SecurityConfigError, match="weights.key_file: required"):
        serving.check_model_source(str(enc_dir), ServeSettings(model="m", weights={"key_provider": "file"}).weights)
