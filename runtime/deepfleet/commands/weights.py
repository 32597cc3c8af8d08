"""`deepfleet weights ...`: SHA256 manifests and encryption at rest of model directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deepfleet.security.crypto import CIPHERS, KEY_ENV

weights_app = typer.Typer(
    help="Weight integrity (SHA256 manifests), encryption at rest, and moving weights between object stores and hosts.",
    no_args_is_help=True,
)

_CIPHER_HELP = f"one of: {', '.join(CIPHERS)}"
_KEY_HELP = f"file holding the key (raw bytes or hex); without it the hex key is read from ${KEY_ENV}"


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(1)


def _new_secret_file(path: Path, mode: str = "wb"):
    """A file that did not exist before, readable by its owner only: a key is never overwritten nor widened."""
    import os

    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), mode)


def _data_key(key_file: Path) -> bytes:
    """The data key as `keygen` writes it (raw 16/32 bytes) or as hex text; `-` reads it from standard input (so
    a deployment tool can hand it over without writing it to a file)."""
    import sys

    raw = sys.stdin.buffer.read() if str(key_file) == "-" else key_file.read_bytes()
    if len(raw) in (16, 32):
        return raw
    try:
        return bytes.fromhex(raw.decode().strip())
    except ValueError:
        raise ValueError(f"{key_file}: the data key is neither 16/32 raw bytes nor hex text") from None


@weights_app.command("manifest")
def manifest(model_dir: Annotated[Path, typer.Argument(help="model directory")]) -> None:
    """Write deepfleet-manifest.json (sha256 + size of every file) into MODEL_DIR."""
    from deepfleet.security.manifest import write_manifest

    try:
        path = write_manifest(model_dir)
    except OSError as e:
        raise _fail(e) from None
    typer.echo(f"wrote {path}")


@weights_app.command("verify")
def verify(model_dir: Annotated[Path, typer.Argument(help="model directory")]) -> None:
    """Check MODEL_DIR against its manifest; exit 1 naming each missing, unexpected or changed file."""
    from deepfleet.security.manifest import ManifestError, verify_manifest

    try:
        verify_manifest(model_dir)
    except (ManifestError, OSError) as e:
        raise _fail(e) from None
    typer.echo(f"{model_dir}: all files match the manifest")


@weights_app.command("keygen")
def keygen(
    key_file: Annotated[Path, typer.Argument(help="where to write the new key (mode 0600; never overwritten)")],
    cipher: Annotated[str, typer.Option("--cipher", help=_CIPHER_HELP)] = "aes-256-gcm",
) -> None:
    """Write a new random key for CIPHER (for a lab; production keys come from a KMS or Vault)."""
    from deepfleet.security.crypto import WeightCryptoError, generate_key

    try:
        key = generate_key(cipher)
        f = _new_secret_file(key_file)
    except (WeightCryptoError, OSError) as e:
        raise _fail(e) from None
    with f:
        f.write(key)
    typer.echo(f"wrote a {len(key)}-byte {cipher} key to {key_file}")


@weights_app.command("encrypt")
def encrypt(
    model_dir: Annotated[Path, typer.Argument(help="plaintext model directory")],
    out_dir: Annotated[Path, typer.Argument(help="where the .dfenc files go")],
    cipher: Annotated[str, typer.Option("--cipher", help=_CIPHER_HELP)] = "aes-256-gcm",
    key_file: Annotated[Path | None, typer.Option("--key-file", help=_KEY_HELP)] = None,
) -> None:
    """Encrypt every file of MODEL_DIR into OUT_DIR (write a manifest first so decryption can be verified)."""
    from deepfleet.security.crypto import WeightCryptoError, encrypt_dir, load_key

    try:
        written = encrypt_dir(model_dir, out_dir, load_key(cipher, key_file), cipher)
    except (WeightCryptoError, OSError) as e:
        raise _fail(e) from None
    typer.echo(f"encrypted {len(written)} files with {cipher} into {out_dir}")


@weights_app.command("decrypt")
def decrypt(
    enc_dir: Annotated[Path, typer.Argument(help="directory of .dfenc files")],
    out_dir: Annotated[Path, typer.Argument(help="target directory, e.g. on a tmpfs")],
    key_file: Annotated[Path | None, typer.Option("--key-file", help=_KEY_HELP)] = None,
) -> None:
    """Decrypt ENC_DIR into OUT_DIR, authenticating every chunk, then verify the manifest if one was included.
    The cipher is read from the files' headers."""
    from deepfleet.security.crypto import WeightCryptoError, decrypt_model
    from deepfleet.security.manifest import ManifestError

    try:
        written = decrypt_model(enc_dir, out_dir, key_file)
    except (WeightCryptoError, ManifestError, OSError) as e:
        raise _fail(e) from None
    typer.echo(f"decrypted {len(written)} files into {out_dir}")


# The rclone options fetch and sync share.
RcloneConfig = Annotated[Path | None, typer.Option(
    "--rclone-config", help="rclone config file naming the remotes (credentials inside, mode 0600)")]
Transfers = Annotated[int, typer.Option("--transfers", min=1, help="files transferred in parallel")]
Bwlimit = Annotated[str | None, typer.Option("--bwlimit", help="rclone bandwidth limit, e.g. 200M")]


def _rclone(config: Path | None, transfers: int, bwlimit: str | None):
    from deepfleet.store.rclone import Rclone

    return Rclone(config=config, transfers=transfers, bwlimit=bwlimit)


@weights_app.command("fetch")
def fetch(
    origin: Annotated[str, typer.Argument(help="rclone path of the model in the object store, e.g. "
                                               "store:deepfleet-models/tiny-qwen2 (revisions are folders below)")],
    model_dir: Annotated[Path, typer.Argument(help="the model's local folder, e.g. /models/tiny-qwen2")],
    revision: Annotated[str, typer.Option("--revision", help="revision folder to fetch")],
    cache: Annotated[str | None, typer.Option("--cache", help="site cache URL (rclone serve http of "
                                                              "<cache>/<model>/<revision>), tried first")] = None,
    rclone_config: RcloneConfig = None,
    transfers: Transfers = 8,
    bwlimit: Bwlimit = None,
    keep: Annotated[int, typer.Option("--keep", min=1, help="revisions kept (the served one always stays)")] = 2,
    group: Annotated[str | None, typer.Option("--group", help="give the revision to root:GROUP, files 0640 and "
                                                              "folders 0750, before it appears")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON (for automation)")] = False,
) -> None:
    """Fetch REVISION into MODEL_DIR/REVISION: free space checked first, transfer resumable, SHA256 manifest
    verified before the folder appears; older revisions pruned. MODEL_DIR/current is left for the restart to flip."""
    import dataclasses
    import json

    from deepfleet.store.fetch import FetchError
    from deepfleet.store.fetch import fetch as fetch_revision

    try:
        log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
        result = fetch_revision(_rclone(rclone_config, transfers, bwlimit), origin, model_dir, revision, cache=cache,
                                keep=keep, group=group, log=log)
    except (FetchError, OSError) as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps({**dataclasses.asdict(result), "changed": result.changed}))
    else:
        pruned = f"; pruned {', '.join(result.pruned)}" if result.pruned else ""
        typer.echo(f"{result.path}: {result.source}{pruned}")


@weights_app.command("sync")
def sync(
    src: Annotated[str, typer.Argument(help="rclone path of the source prefix, e.g. s3:deepfleet-models/")],
    dst: Annotated[str, typer.Argument(help="rclone path of the copy, e.g. oss:deepfleet-models/")],
    rclone_config: RcloneConfig = None,
    transfers: Transfers = 8,
    bwlimit: Bwlimit = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Make DST equal to SRC, comparing checksums (changed objects copied, objects gone from SRC deleted), and
    report what was copied and deleted."""
    import dataclasses
    import json

    from deepfleet.store.rclone import RcloneError

    try:
        report = _rclone(rclone_config, transfers, bwlimit).mirror(src, dst, checksum=True)
    except RcloneError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report)))
        return
    for obj in report.copied:
        typer.echo(f"copied  {obj}")
    for obj in report.deleted:
        typer.echo(f"deleted {obj}")
    typer.echo(f"{src} -> {dst}: {len(report.copied)} copied, {len(report.deleted)} deleted")


@weights_app.command("wrap-key")
def wrap_key(
    key_file: Annotated[Path, typer.Argument(help="the data key (as written by `keygen`, raw or hex; - = stdin)")],
    out: Annotated[Path, typer.Argument(help="where the wrapped key goes (weights.pkcs11.wrapped_key_file)")],
    module: Annotated[Path, typer.Option("--module", help="PKCS#11 library (.so) of the HSM or SoftHSM2")],
    token_label: Annotated[str, typer.Option("--token-label", help="token holding the key-encryption key")],
    key_label: Annotated[str, typer.Option("--key-label", help="label of the AES key-encryption key")],
    pin_file: Annotated[Path | None, typer.Option("--pin-file", help="user PIN file (else $DEEPFLEET_PKCS11_PIN)")]
    = None,
    create_kek: Annotated[bool, typer.Option("--create-kek", help="generate the key-encryption key in the token "
                                             "first (non-extractable)")] = False,
) -> None:
    """Wrap a data key with a key-encryption key that never leaves the PKCS#11 token; serve with
    weights.pkcs11.* pointing at OUT (then the plain key file can be destroyed)."""
    from deepfleet.security.errors import SecurityConfigError
    from deepfleet.security.keys import Pkcs11Settings
    from deepfleet.security.pkcs11_store import create_kek as make_kek
    from deepfleet.security.pkcs11_store import wrap_data_key

    cfg = Pkcs11Settings(module=module, token_label=token_label, key_label=key_label, wrapped_key_file=out,
                         pin_file=pin_file)
    try:
        if create_kek:
            make_kek(cfg)
        blob = wrap_data_key(cfg, _data_key(key_file))
        f = _new_secret_file(out)
    except (SecurityConfigError, OSError, ValueError) as e:
        raise _fail(e) from None
    with f:
        f.write(blob)
    typer.echo(f"wrote the data key wrapped by {key_label!r} of token {token_label!r} to {out}")


@weights_app.command("vault-wrap-key")
def vault_wrap_key(
    key_file: Annotated[Path, typer.Argument(help="the data key (as written by `keygen`, raw or hex; - = stdin)")],
    out: Annotated[Path, typer.Argument(help="where the ciphertext goes (weights.vault.wrapped_key_file)")],
    address: Annotated[str, typer.Option("--address", help="Vault's (or OpenBao's) URL")],
    key_name: Annotated[str, typer.Option("--key-name", help="transit key that encrypts the data key")],
    mount_point: Annotated[str, typer.Option("--mount-point", help="mount path of the transit engine")] = "transit",
    token_file: Annotated[Path | None, typer.Option("--token-file", help="Vault token file (else $VAULT_TOKEN)")]
    = None,
    ca_file: Annotated[Path | None, typer.Option("--ca-file", help="CA of Vault's TLS certificate")] = None,
) -> None:
    """Encrypt a data key with a Vault transit key; serve with weights.vault.* pointing at OUT (then the plain
    key file can be destroyed)."""
    from deepfleet.security.errors import SecurityConfigError
    from deepfleet.security.vault_store import VaultSettings, wrap_data_key

    cfg = VaultSettings(address=address, key_name=key_name, wrapped_key_file=out, mount_point=mount_point,
                        token_file=token_file, ca_file=ca_file)
    try:
        ciphertext = wrap_data_key(cfg, _data_key(key_file))
        f = _new_secret_file(out, "w")
    except (SecurityConfigError, OSError, ValueError) as e:
        raise _fail(e) from None
    with f:
        f.write(ciphertext + "\n")
    typer.echo(f"wrote the data key encrypted by transit key {key_name!r} of {address} to {out}")


def register(app: typer.Typer) -> None:
    """Attach `deepfleet weights` to the root app."""
    app.add_typer(weights_app, name="weights")
