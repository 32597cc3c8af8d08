"""Key providers for encrypted weights: where the data key (the AES-256/SM4 key of the .dfenc files) comes from.

- `file`: a key file (raw bytes or hex), e.g. a Kubernetes Secret mounted read-only;
- `env`: $DEEPFLEET_WEIGHTS_KEY (hex), e.g. injected by a Vault agent;
- `pkcs11`: envelope encryption with a key store: the data key is kept only wrapped (AES-GCM) under a
  key-encryption key that never leaves the PKCS#11 token (an HSM; SoftHSM2 in tests, the same code path), and
  the token unwraps it at start-up. The token, its PIN or the key missing stops the server with the reason.
- `vault`: the same envelope with Vault's transit engine (vault_store.py; OpenBao in tests): the data key is
  kept as transit ciphertext and Vault decrypts it at start-up. Vault unreachable, the token refused or the key
  missing stops the server with the reason.
A provider is a function from the settings to the data key (`data_key` below); another key store is one more
branch with its settings section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deepfleet.security.crypto import KEY_ENV, WeightCryptoError, load_key
from deepfleet.security.errors import SecurityConfigError
from deepfleet.security.vault_store import VaultSettings

PIN_ENV = "DEEPFLEET_PKCS11_PIN"


class Pkcs11Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: Path = Field(description="PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so or the HSM vendor's.")
    token_label: str = Field(min_length=1, description="Label of the token holding the key-encryption key.")
    key_label: str = Field(min_length=1, description="Label of the AES key-encryption key in the token.")
    wrapped_key_file: Path = Field(description="The data key wrapped by that key (`deepfleet weights wrap-key`).")
    pin_file: Path | None = Field(None, description=f"File holding the user PIN; unset = ${PIN_ENV}.")


class WeightsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_provider: Literal["file", "env", "pkcs11", "vault"] | None = Field(
        None, description="Where the key of an encrypted model (.dfenc files) comes from; unset = pkcs11 when "
        "weights.pkcs11 is set, vault when weights.vault is set, file when weights.key_file is set, else env."
    )
    key_file: Path | None = Field(None, description="Key file (raw or hex) for key_provider file.")
    pkcs11: Pkcs11Settings | None = Field(None, description="The key store for key_provider pkcs11.")
    vault: VaultSettings | None = Field(None, description="Vault's transit engine for key_provider vault.")

    def provider(self) -> str:
        if self.key_provider is not None:
            return self.key_provider
        if self.pkcs11:
            return "pkcs11"
        if self.vault:
            return "vault"
        return "file" if self.key_file else "env"


def data_key(weights: WeightsSettings, cipher: str) -> bytes:
    """The data key for `cipher` from the configured provider; SecurityConfigError naming the setting otherwise."""
    provider = weights.provider()
    try:
        if provider == "file":
            if weights.key_file is None:
                raise SecurityConfigError("weights.key_file: required for weights.key_provider file")
            return load_key(cipher, weights.key_file)
        if provider == "env":
            if not os.environ.get(KEY_ENV):
                raise SecurityConfigError(f"weights.key_provider env: ${KEY_ENV} is not set")
            return load_key(cipher, None)
        if provider == "vault":
            if weights.vault is None:
                raise SecurityConfigError("weights.vault: required for weights.key_provider vault")
            from deepfleet.security.vault_store import unwrap_data_key as unwrap_vault

            key = unwrap_vault(weights.vault)
            check_key_size(cipher, key, "weights.vault.wrapped_key_file")
            return key
        if weights.pkcs11 is None:
            raise SecurityConfigError("weights.pkcs11: required for weights.key_provider pkcs11")
        from deepfleet.security.pkcs11_store import unwrap_data_key

        key = unwrap_data_key(weights.pkcs11)
        check_key_size(cipher, key)
        return key
    except OSError as e:
        raise SecurityConfigError(f"weights ({provider} key provider): {e}") from None
    except WeightCryptoError as e:
        raise SecurityConfigError(f"weights ({provider} key provider): {e}") from None


def check_key_size(cipher: str, key: bytes, setting: str = "weights.pkcs11.wrapped_key_file") -> None:
    from deepfleet.security.crypto import cipher_spec

    spec = cipher_spec(cipher)
    if len(key) != spec.key_size:
        raise SecurityConfigError(f"{setting}: unwraps to a {len(key)}-byte key, {spec.name} needs {spec.key_size}")


def read_pin(cfg: Pkcs11Settings) -> str:
    if cfg.pin_file is not None:
        return Path(cfg.pin_file).read_text().strip()
    pin = os.environ.get(PIN_ENV)
    if not pin:
        raise SecurityConfigError(f"weights.pkcs11.pin_file: unset and ${PIN_ENV} is empty (the token's user PIN)")
    return pin
