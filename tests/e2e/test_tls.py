"""TLS: with `server.certfile`/`keyfile` set, `gateway serve` speaks HTTPS only.

The certificates are made in the test with `cryptography`: a throw-away CA and a server
certificate for 127.0.0.1 signed by it; clients trust the CA file, as a site would.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.cli.control import admin_tls
from gateway.config import load_settings
from tests.conftest import jpeg_bytes
from tests.support.gateway_proc import ADMIN_TOKEN, GatewayProcess

pytestmark = pytest.mark.e2e


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for a server at 127.0.0.1 / localhost."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


def test_upload_over_https_with_the_site_ca(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    gw = GatewayProcess(tmp_path / "gw", {
        "GATEWAY_STORAGE_BACKEND": "folder",
        "GATEWAY_SERVER_CERTFILE": str(cert),
        "GATEWAY_SERVER_KEYFILE": str(key),
    }).start(wait_ready=False)
    base = f"https://127.0.0.1:{gw.port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/api/ready", verify=str(ca), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, gw.log_tail()
            time.sleep(0.1)
        with httpx.Client(base_url=base, verify=str(ca), timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            created = client.post("/api/admin/devices", json={"name": "cam-tls"})
            assert created.status_code == 201, created.text
            device_key = created.json()["data"]["key"]
            image = jpeg_bytes(10_000)
            resp = client.post("/api/device/images/upload", headers={"X-Device-Key": device_key},
                               files={"image": ("tls.jpg", image, "image/jpeg")})
            assert resp.status_code == 201, resp.text
            assert resp.json()["data"]["storage_key"].endswith("_tls.jpg")
            # TLS 1.2 at least, whatever the client offers.
            assert client.get("/api/health").status_code == 200
        # A client that does not trust the site CA is refused by its own TLS check.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/api/health", timeout=5)
        # Plain HTTP on the TLS port gets no HTTP answer.
        with pytest.raises(httpx.HTTPError):
            r = httpx.get(f"http://127.0.0.1:{gw.port}/api/health", timeout=5)
            if r.status_code == 200:  # pragma: no cover - would mean plain HTTP is served
                raise AssertionError("plain HTTP served on the TLS port")
            raise httpx.HTTPError(f"refused with {r.status_code}")
        ctx = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(verify=ctx) as client:
            version = client.get(f"{base}/api/health").extensions["network_stream"].get_extra_info("ssl_object")
            assert version is None or version.version() in ("TLSv1.2", "TLSv1.3")
        # The CLI reaches the running server over HTTPS too (admin URL derived from the settings).
        status = gw.cli("status", "--json")
        assert json.loads(status.stdout)["images"] == 1
    finally:
        gw.stop()


def _settings(tmp_path: Path, **env: str) -> Any:
    (tmp_path / "cli.toml").write_text("")
    return load_settings(tmp_path / "cli.toml", env={f"GATEWAY_{k.upper()}": v for k, v in env.items()})


def test_the_cli_trusts_loopback_and_checks_any_other_host(tmp_path: Path) -> None:
    for url in ("https://127.0.0.1:8443", "https://localhost:8443", "https://[::1]:8443"):
        assert admin_tls(_settings(tmp_path, admin_url=url)) is False, url
    assert admin_tls(_settings(tmp_path, admin_url="http://192.0.2.7:8080")) is True  # no TLS at all
    remote = admin_tls(_settings(tmp_path, admin_url="https://gateway.plant.example:8443"))
    assert isinstance(remote, ssl.SSLContext)
    assert remote.verify_mode == ssl.CERT_REQUIRED and remote.check_hostname


def test_a_remote_admin_url_is_checked_against_the_servers_own_certificate(tmp_path: Path) -> None:
    """The context the CLI uses for a non-loopback admin URL, tried on a real TLS server (reached
    on 127.0.0.1, which its certificate names): with the server's certificate file on this host it
    connects; with only the system's CAs it refuses the unknown site CA."""
    _ca, cert, key = make_certificates(tmp_path)
    gw = GatewayProcess(tmp_path / "gw", {
        "GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_SERVER_CERTFILE": str(cert), "GATEWAY_SERVER_KEYFILE": str(key),
    }).start(wait_ready=False)
    base = f"https://127.0.0.1:{gw.port}"
    try:
        with_cert = admin_tls(_settings(tmp_path, admin_url="https://gateway.plant.example:8443",
                                        server_certfile=str(cert), server_keyfile=str(key)))
        without = admin_tls(_settings(tmp_path, admin_url="https://gateway.plant.example:8443"))
        assert isinstance(with_cert, ssl.SSLContext) and isinstance(without, ssl.SSLContext)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/api/health", verify=with_cert, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, gw.log_tail()
            time.sleep(0.1)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/api/health", verify=without, timeout=5)
    finally:
        gw.stop()
