"""TLS for `deepfleet serve`: TLS 1.3 only (`minimum_version`; no 1.2 fallback, so no legacy cipher suites or
renegotiation), the certificate chain checked against its key at start-up, optional mutual TLS (`client_ca_file`:
a client certificate signed by that CA is required)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deepfleet.security.errors import SecurityConfigError


class TLSSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = Field(None, description="PEM server certificate chain; set (with key_file) = HTTPS, "
                                   "TLS 1.3 only.")
    key_file: Path | None = Field(None, description="PEM private key of cert_file (keep it mode 0600 or 0640).")
    client_ca_file: Path | None = Field(None, description="PEM CA bundle: clients must present a certificate it "
                                        "signed (mutual TLS).")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The server's SSLContext; raises SecurityConfigError naming the setting and file that is wrong."""
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "tls.key_file" if tls.key_file is None else "tls.cert_file"
        raise SecurityConfigError(f"{missing}: required together with the other of tls.cert_file/tls.key_file")
    if tls.client_ca_file is not None and tls.cert_file is None:
        raise SecurityConfigError("tls.client_ca_file: mutual TLS needs tls.cert_file and tls.key_file")
    for name in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, name)
        if path is not None and not Path(path).is_file():
            raise SecurityConfigError(f"tls.{name} {path}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise SecurityConfigError(f"tls.key_file {tls.key_file}: does not match the certificate in "
                                      f"tls.cert_file {tls.cert_file}") from None
        raise SecurityConfigError(f"tls.cert_file {tls.cert_file} / tls.key_file {tls.key_file}: cannot be "
                                  f"loaded ({e.reason or e})") from None
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
        except ssl.SSLError as e:
            raise SecurityConfigError(f"tls.client_ca_file {tls.client_ca_file}: not a PEM CA bundle "
                                      f"({e.reason or e})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def uvicorn_options(tls: TLSSettings) -> dict[str, Any]:
    """uvicorn.Config keywords serving HTTPS with our context (built, so checked, now: before the port opens)."""
    if not tls.enabled and tls.key_file is None and tls.client_ca_file is None:
        return {}
    context = server_context(tls)
    return {"ssl_context_factory": lambda _config, _default: context}
