"""Vault's transit engine as the weights' key store (hvac; HashiCorp Vault or OpenBao, the same API): the data
key is kept only as transit ciphertext (`vault:v1:...`, a text file), encrypted by a transit key that never
leaves Vault, and Vault decrypts it at start-up for a token allowed `update` on `<mount>/decrypt/<key>`. The
same envelope as the PKCS#11 store (pkcs11_store.py), with the key-encryption key in Vault instead of an HSM.
Every failure (address, TLS, token, permission, key name, ciphertext) names its setting."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deepfleet.security.errors import SecurityConfigError

TOKEN_ENV = "VAULT_TOKEN"


class VaultSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = Field(min_length=1, description="Vault's (or OpenBao's) URL, e.g. https://vault.example:8200.")
    key_name: str = Field(min_length=1, description="Name of the transit key that encrypts the data key.")
    wrapped_key_file: Path = Field(description="The data key as transit ciphertext (`deepfleet weights "
                                               "vault-wrap-key`).")
    mount_point: str = Field("transit", min_length=1, description="Mount path of the transit engine.")
    token_file: Path | None = Field(None, description=f"File holding the Vault token (e.g. written by a Vault "
                                                      f"agent); unset = ${TOKEN_ENV}.")
    ca_file: Path | None = Field(None, description="CA certificate(s) Vault's TLS certificate is verified "
                                                   "against; unset = the system's.")
    timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for Vault before start-up fails.")


def _token(cfg: VaultSettings) -> str:
    if cfg.token_file is not None:
        try:
            return Path(cfg.token_file).read_text().strip()
        except OSError as e:
            raise SecurityConfigError(f"weights.vault.token_file {cfg.token_file}: {e.strerror}") from None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise SecurityConfigError(f"weights.vault.token_file: unset and ${TOKEN_ENV} is empty (a Vault token "
                                  "allowed to decrypt with the transit key)")
    return token


def _transit(cfg: VaultSettings, action: str, **kwargs) -> dict:
    """One call of the transit engine (`encrypt_data`/`decrypt_data`), its errors named by setting."""
    try:
        import hvac
        import requests
    except ImportError:
        raise SecurityConfigError("weights.vault: hvac is not installed (pip install 'deepfleet-runtime[vault]')"
                                  ) from None
    client = hvac.Client(url=cfg.address, token=_token(cfg), timeout=cfg.timeout_s,
                         verify=str(cfg.ca_file) if cfg.ca_file else True)
    call = getattr(client.secrets.transit, action)
    key = f"transit key {cfg.key_name!r} (mount {cfg.mount_point!r})"
    try:
        return call(name=cfg.key_name, mount_point=cfg.mount_point, **kwargs)["data"]
    except requests.exceptions.SSLError as e:
        raise SecurityConfigError(f"weights.vault.address {cfg.address}: TLS verification failed "
                                  f"(weights.vault.ca_file {cfg.ca_file}): {e}") from None
    except requests.exceptions.RequestException as e:
        raise SecurityConfigError(f"weights.vault.address {cfg.address}: cannot reach the key store "
                                  f"({type(e).__name__})") from None
    except hvac.exceptions.Unauthorized:
        raise SecurityConfigError(f"weights.vault.token_file: the token is not valid at {cfg.address} "
                                  "(expired or revoked?)") from None
    except hvac.exceptions.Forbidden:
        raise SecurityConfigError(f"weights.vault.token_file: the token may not {action.split('_')[0]} with "
                                  f"{key} (permission denied: its policy does not allow it, or the key or mount is "
                                  "not there under it, or the token is unknown)") from None
    except hvac.exceptions.InvalidPath:
        raise SecurityConfigError(f"weights.vault.mount_point {cfg.mount_point!r}: no transit engine there "
                                  f"at {cfg.address}") from None
    except hvac.exceptions.VaultError as e:
        errors = "; ".join(getattr(e, "errors", None) or [str(e)])
        field = "key_name" if "key not found" in errors else "wrapped_key_file"
        raise SecurityConfigError(f"weights.vault.{field}: Vault refused to {action.split('_')[0]} with {key}: "
                                  f"{errors}") from None


def wrap_data_key(cfg: VaultSettings, data_key: bytes) -> str:
    """The data key as transit ciphertext (`vault:v1:...`)."""
    return _transit(cfg, "encrypt_data", plaintext=base64.b64encode(data_key).decode())["ciphertext"]


def unwrap_data_key(cfg: VaultSettings) -> bytes:
    where = f"weights.vault.wrapped_key_file {cfg.wrapped_key_file}"
    try:
        ciphertext = Path(cfg.wrapped_key_file).read_text().strip()
    except OSError as e:
        raise SecurityConfigError(f"{where}: {e.strerror}") from None
    except UnicodeDecodeError:
        ciphertext = ""
    if not ciphertext.startswith("vault:v"):
        raise SecurityConfigError(f"{where}: not transit ciphertext (expected 'vault:v<N>:...')")
    return base64.b64decode(_transit(cfg, "decrypt_data", ciphertext=ciphertext)["plaintext"])
