"""edgeft certs: a development CA whose certificates grpc accepts; the coordinator checks its TLS files."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509

from edgeft.cli import main
from edgeft.errors import ConfigError
from edgeft.server.certs import CertsConfig, make_certs, server_credentials
from edgeft.server.config import TlsConfig


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_from_the_command_line_chain_to_their_ca_and_keys_stay_private(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--host", "coordinator.example", "--host", "10.0.0.5",
                 "--client", "kiosk-1", "--client", "kiosk-2"]) == 0
    printed = capsys.readouterr().out
    assert "[server.tls]" in printed and "--client-cert" in printed
    ca = load(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = load(out / "server.pem")
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    for name in ("kiosk-1", "kiosk-2"):
        client = load(out / f"{name}.pem")
        client.verify_directly_issued_by(ca)
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage
    for key in out.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    # a second run reuses the CA, so certificates made later still chain to it
    make_certs(CertsConfig(out=out, clients=("kiosk-3",)))
    assert load(out / "ca.pem") == ca
    load(out / "kiosk-3.pem").verify_directly_issued_by(ca)


def test_bad_tls_files_are_named_before_the_coordinator_serves(tmp_path):
    a = make_certs(CertsConfig(out=tmp_path / "a"))
    b = make_certs(CertsConfig(out=tmp_path / "b"))
    assert server_credentials(TlsConfig(cert=a["server"], key=a["server_key"], client_ca=a["ca"])) is not None
    with pytest.raises(ConfigError, match="not the key of the certificate"):
        server_credentials(TlsConfig(cert=a["server"], key=b["server_key"]))
    with pytest.raises(ConfigError, match="tls.cert=.*cannot read it"):
        server_credentials(TlsConfig(cert=tmp_path / "missing.pem", key=a["server_key"]))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls.client_ca=.*not a PEM file"):
        server_credentials(TlsConfig(cert=a["server"], key=a["server_key"], client_ca=tmp_path / "junk.pem"))
    with pytest.raises(ConfigError, match="client name 'server'"):
        CertsConfig(out=tmp_path / "c", clients=("server",))
