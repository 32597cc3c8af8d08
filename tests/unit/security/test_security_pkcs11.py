"""The PKCS#11 key store on a real SoftHSM2 token, initialised in a temporary directory: the data key wrapped by
a non-extractable key in the token serves an encrypted model; an unreachable library, an unknown token, a wrong
PIN, a missing key label or an altered wrapped key stop the start with the reason (no fallback)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepfleet.cli import app as cli_app
from deepfleet.security import serving
from deepfleet.security.crypto import encrypt_dir, generate_key
from deepfleet.security.errors import SecurityConfigError
from deepfleet.security.keys import PIN_ENV, WeightsSettings, data_key
from deepfleet.security.manifest import write_manifest
from deepfleet.security.pkcs11_store import create_kek, wrap_data_key

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN, SO_PIN, LABEL = "5678", "1234", "deepfleet-test"


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    if shutil.which("softhsm2-util") is None or not MODULE.is_file():
        pytest.fail("SoftHSM2 is missing: run scripts/install-deps.sh (apt package softhsm2)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read when the library is first loaded in this process
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--so-pin", SO_PIN, "--pin", PIN],
                   check=True, capture_output=True, env=os.environ)
    (root / "pin").write_text(PIN + "\n")
    return root


def settings(token, **over) -> dict:
    base = {"module": str(MODULE), "token_label": LABEL, "key_label": "weights-kek",
            "wrapped_key_file": str(token / "wrapped.key"), "pin_file": str(token / "pin")}
    return {**base, **over}


@pytest.fixture(scope="module")
def wrapped(token):
    cfg = WeightsSettings(pkcs11=settings(token)).pkcs11
    create_kek(cfg)
    key = generate_key("aes-256-gcm")
    (token / "wrapped.key").write_bytes(wrap_data_key(cfg, key))
    return key


def test_the_token_unwraps_the_data_key(token, wrapped):
    assert data_key(WeightsSettings(pkcs11=settings(token)), "aes-256-gcm") == wrapped
    assert wrapped not in (token / "wrapped.key").read_bytes()


def test_the_kek_cannot_be_read_out_of_the_token(token, wrapped):
    import pkcs11

    with pkcs11.lib(str(MODULE)).get_token(token_label=LABEL).open(user_pin=PIN) as session:
        kek = session.get_key(label="weights-kek")
        assert kek[pkcs11.Attribute.EXTRACTABLE] is False and kek[pkcs11.Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            kek[pkcs11.Attribute.VALUE]


def test_serving_an_encrypted_model_with_the_token(token, wrapped, tmp_path):
    from deepfleet.models.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", arch="qwen2", seed=1)
    write_manifest(model)
    encrypt_dir(model, tmp_path / "enc", wrapped, "aes-256-gcm")
    serving.check_model_source(str(tmp_path / "enc"), WeightsSettings(pkcs11=settings(token)))


@pytest.mark.parametrize("over, reason", [
    ({"module": "/nonexistent/libhsm.so"}, "weights.pkcs11.module /nonexistent/libhsm.so: cannot load"),
    ({"token_label": "no-such-token"}, "weights.pkcs11.token_label 'no-such-token': no such token"),
    ({"key_label": "no-such-key"}, "weights.pkcs11.key_label 'no-such-key': no AES key with that label"),
    ({"pin_file": None}, f"${PIN_ENV} is empty"),
])
def test_unreachable_key_store_fails_with_the_reason(token, wrapped, monkeypatch, over, reason):
    monkeypatch.delenv(PIN_ENV, raising=False)
    with pytest.raises(SecurityConfigError) as e:
        data_key(WeightsSettings(pkcs11=settings(token, **over)), "aes-256-gcm")
    assert reason in str(e.value)


def test_wrong_pin(token, wrapped, tmp_path):
    (tmp_path / "pin").write_text("0000")
    with pytest.raises(SecurityConfigError, match="PIN of token 'deepfleet-test' is wrong"):
        data_key(WeightsSettings(pkcs11=settings(token, pin_file=str(tmp_path / "pin"))), "aes-256-gcm")


def test_altered_wrapped_key(token, wrapped, tmp_path):
    blob = bytearray((token / "wrapped.key").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "w").write_bytes(bytes(blob))
    with pytest.raises(SecurityConfigError, match="does not unwrap it"):
        data_key(WeightsSettings(pkcs11=settings(token, wrapped_key_file=str(tmp_path / "w"))), "aes-256-gcm")


def test_wrap_key_command(token, wrapped, tmp_path, monkeypatch):
    monkeypatch.setenv(PIN_ENV, PIN)
    key = generate_key("sm4-gcm")
    (tmp_path / "k").write_bytes(key)
    out = CliRunner().invoke(cli_app, ["weights", "wrap-key", str(tmp_path / "k"), str(tmp_path / "w"), "--module",
                                       str(MODULE), "--token-label", LABEL, "--key-label", "weights-kek"])
    assert out.exit_code == 0, out.output
    cfg = settings(token, wrapped_key_file=str(tmp_path / "w"), pin_file=None)
    assert data_key(WeightsSettings(pkcs11=cfg), "sm4-gcm") == key
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o600


def test_wrap_key_reads_the_data_key_from_stdin(token, wrapped, tmp_path, monkeypatch):
    monkeypatch.setenv(PIN_ENV, PIN)
    key = generate_key("aes-256-gcm")
    args = ["weights", "wrap-key", "-", str(tmp_path / "w"), "--module", str(MODULE), "--token-label", LABEL,
            "--key-label", "weights-kek"]
    out = CliRunner().invoke(cli_app, args, input=key.hex() + "\n")
    assert out.exit_code == 0, out.output
    cfg = settings(token, wrapped_key_file=str(tmp_path / "w"), pin_file=None)
    assert data_key(WeightsSettings(pkcs11=cfg), "aes-256-gcm") == key
    bad = CliRunner().invoke(cli_app, [*args[:3], str(tmp_path / "w2"), *args[4:]], input="not a key\n")
    assert bad.exit_code == 1 and "-: the data key is neither 16/32 raw bytes nor hex text" in bad.output
    assert not (tmp_path / "w2").exists()
