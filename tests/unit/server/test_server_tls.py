"""TLS on a live loopback server: TLS 1.3 is served, a client limited to TLS 1.2 is refused in the handshake,
mutual TLS requires a certificate from the configured CA, and a certificate that does not match its key (or a
missing file) stops the start naming the setting and file."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest
from auth_helpers import TestCA
from server_fakes import GatedFakeEngine
from server_helpers import live_server, settings_for

from deepfleet.security.errors import SecurityConfigError
from deepfleet.server.tls import TLSSettings, server_context


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("tls"))


def _serve(tiny_model, **tls):
    engine = GatedFakeEngine()
    engine.gate.set()
    settings = settings_for(tiny_model, warmup_requests=0, engine_process=False, tls=tls)
    return live_server(settings, lambda _s: engine)


def _handshake(port: int, ca: TestCA, version: ssl.TLSVersion, cert: tuple | None = None) -> str:
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    context.minimum_version = context.maximum_version = version
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(
        raw, server_hostname="localhost"
    ) as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = tls.recv(4096)  # with TLS 1.3 a refused client certificate surfaces on the first read
        if not reply:
            raise ConnectionError("the server closed the connection without answering")
        return f"{tls.version()} {reply.split(b' ')[1].decode()}"


@pytest.fixture(scope="module")
def tls_server(tiny_model, ca):
    cert, key = ca.issue("server")
    with _serve(tiny_model, cert_file=str(cert), key_file=str(key)) as s:
        yield s


def test_tls13_is_served(tls_server, ca):
    assert _handshake(tls_server.settings.port, ca, ssl.TLSVersion.TLSv1_3) == "TLSv1.3 200"
    r = httpx.get(tls_server.url + "/healthz", verify=ssl.create_default_context(cafile=str(ca.cert_file)))
    assert r.status_code == 200 and tls_server.url.startswith("https://")


def test_a_tls12_client_is_refused_in_the_handshake(tls_server, ca):
    with pytest.raises(ssl.SSLError):  # the server ends the handshake (alert or EOF): no session below 1.3
        _handshake(tls_server.settings.port, ca, ssl.TLSVersion.TLSv1_2)


def test_plain_http_gets_no_answer(tls_server):
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https", "http") + "/healthz", timeout=5)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tiny_model, ca, tmp_path):
    cert, key = ca.issue("server-mtls")
    client = ca.issue("client", server=False)
    stranger = TestCA(tmp_path).issue("stranger", server=False)  # signed by another CA
    with _serve(tiny_model, cert_file=str(cert), key_file=str(key), client_ca_file=str(ca.cert_file)) as s:
        port = s.settings.port
        assert _handshake(port, ca, ssl.TLSVersion.TLSv1_3, client) == "TLSv1.3 200"
        for bad in (None, stranger):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _handshake(port, ca, ssl.TLSVersion.TLSv1_3, bad)


def test_certificate_not_matching_its_key_is_refused(ca):
    cert, _ = ca.issue("one")
    _, other_key = ca.issue("two")
    with pytest.raises(SecurityConfigError) as e:
        server_context(TLSSettings(cert_file=cert, key_file=other_key))
    assert f"tls.key_file {other_key}: does not match the certificate in tls.cert_file {cert}" in str(e.value)


def test_bad_tls_inputs_name_the_setting(ca, tmp_path):
    cert, key = ca.issue("three")
    with pytest.raises(SecurityConfigError, match="tls.key_file: required together"):
        server_context(TLSSettings(cert_file=cert))
    with pytest.raises(SecurityConfigError, match=f"tls.client_ca_file {tmp_path / 'nope.pem'}: no such file"):
        server_context(TLSSettings(cert_file=cert, key_file=key, client_ca_file=tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(SecurityConfigError, match="tls.cert_file .*junk.pem.* cannot be loaded"):
        server_context(TLSSettings(cert_file=tmp_path / "junk.pem", key_file=key))
    assert server_context(TLSSettings(cert_file=cert, key_file=key)).minimum_version == ssl.TLSVersion.TLSv1_3
