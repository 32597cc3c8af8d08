"""The PKCS#11 key store (python-pkcs11): a key-encryption key (AES-256, sensitive, never extractable) lives in
the token; the weights' data key is stored only wrapped by it, as a file `DFWK1 | nonce (12) | AES-GCM(data key)
with tag`, and the token itself unwraps it (C_Decrypt inside the HSM). SoftHSM2 in tests, a hardware HSM in
production: the same calls. Every failure (library, token, PIN, key, wrapped file) names its setting."""

from __future__ import annotations

import secrets
from pathlib import Path

from deepfleet.security.errors import SecurityConfigError
from deepfleet.security.keys import Pkcs11Settings, read_pin

MAGIC = b"DFWK1"
NONCE_SIZE = 12
_AAD = b"deepfleet weights data key"


def _session(cfg: Pkcs11Settings, rw: bool = False):
    try:
        import pkcs11
    except ImportError:
        raise SecurityConfigError("weights.pkcs11: python-pkcs11 is not installed (pip install "
                                  "'deepfleet-runtime[pkcs11]')") from None
    try:
        lib = pkcs11.lib(str(cfg.module))
    except Exception as e:  # pkcs11 raises RuntimeError/AlreadyInitialized/OSError-like types for a bad library
        raise SecurityConfigError(f"weights.pkcs11.module {cfg.module}: cannot load the PKCS#11 library "
                                  f"({type(e).__name__}: {e})") from None
    try:
        token = lib.get_token(token_label=cfg.token_label)
    except pkcs11.exceptions.NoSuchToken:
        raise SecurityConfigError(f"weights.pkcs11.token_label {cfg.token_label!r}: no such token in "
                                  f"{cfg.module}") from None
    except pkcs11.exceptions.PKCS11Error as e:
        raise SecurityConfigError(f"weights.pkcs11.token_label {cfg.token_label!r}: {type(e).__name__}") from None
    try:
        return pkcs11, token.open(user_pin=read_pin(cfg), rw=rw)
    except (pkcs11.exceptions.PinIncorrect, pkcs11.exceptions.PinLenRange, pkcs11.exceptions.PinInvalid):
        raise SecurityConfigError(f"weights.pkcs11: the user PIN of token {cfg.token_label!r} is wrong") from None
    except pkcs11.exceptions.PinLocked:
        raise SecurityConfigError(f"weights.pkcs11: token {cfg.token_label!r} is locked (PIN)") from None
    except pkcs11.exceptions.PKCS11Error as e:
        raise SecurityConfigError(f"weights.pkcs11: cannot log in to token {cfg.token_label!r} "
                                  f"({type(e).__name__})") from None


def _kek(pkcs11, session, cfg: Pkcs11Settings):
    try:
        return session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, key_type=pkcs11.KeyType.AES,
                               label=cfg.key_label)
    except pkcs11.exceptions.NoSuchKey:
        raise SecurityConfigError(f"weights.pkcs11.key_label {cfg.key_label!r}: no AES key with that label in "
                                  f"token {cfg.token_label!r}") from None
    except pkcs11.exceptions.MultipleObjectsReturned:
        raise SecurityConfigError(f"weights.pkcs11.key_label {cfg.key_label!r}: several keys carry that "
                                  "label") from None


def create_kek(cfg: Pkcs11Settings) -> None:
    """Generate the key-encryption key inside the token (not extractable, not readable)."""
    pkcs11, session = _session(cfg, rw=True)
    with session:
        session.generate_key(pkcs11.KeyType.AES, 256, label=cfg.key_label, store=True,
                             template={pkcs11.Attribute.EXTRACTABLE: False, pkcs11.Attribute.SENSITIVE: True})


def wrap_data_key(cfg: Pkcs11Settings, data_key: bytes) -> bytes:
    pkcs11, session = _session(cfg)
    with session:
        nonce = secrets.token_bytes(NONCE_SIZE)
        params = pkcs11.mechanisms.GCMParams(nonce, _AAD, 128)
        return MAGIC + nonce + _kek(pkcs11, session, cfg).encrypt(data_key, mechanism=pkcs11.Mechanism.AES_GCM,
                                                                   mechanism_param=params)


def unwrap_data_key(cfg: Pkcs11Settings) -> bytes:
    where = f"weights.pkcs11.wrapped_key_file {cfg.wrapped_key_file}"
    try:
        blob = Path(cfg.wrapped_key_file).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{where}: {e.strerror}") from None
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_SIZE + 16:
        raise SecurityConfigError(f"{where}: not a wrapped data key (bad magic or too short)")
    nonce, sealed = blob[len(MAGIC) : len(MAGIC) + NONCE_SIZE], blob[len(MAGIC) + NONCE_SIZE :]
    pkcs11, session = _session(cfg)
    with session:
        kek = _kek(pkcs11, session, cfg)
        try:
            return kek.decrypt(sealed, mechanism=pkcs11.Mechanism.AES_GCM,
                               mechanism_param=pkcs11.mechanisms.GCMParams(nonce, _AAD, 128))
        except pkcs11.exceptions.PKCS11Error as e:
            raise SecurityConfigError(f"{where}: the token's key {cfg.key_label!r} does not unwrap it "
                                      f"({type(e).__name__}: wrong key, or the file was altered)") from None
