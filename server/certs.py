"""TLS files: ``edgeft certs`` (a development CA and server/client certificates for local use) and the
coordinator's credentials from ``[server.tls]``, checked before it serves.

The development certificates are for trying TLS and mutual TLS on a laptop or a test fleet, not for
production (use your organisation's CA there). Keys are EC P-256, written owner-readable only (0600).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeft.errors import ConfigError

if TYPE_CHECKING:
    import grpc

    from edgeft.server.config import TlsConfig

CA_NAME = "ca"
SERVER_NAME = "server"


@dataclass(frozen=True)
class CertsConfig:
    """What to make: a CA in ``out`` (reused when ``ca.pem``/``ca.key`` are there), a server certificate for
    ``hosts`` (DNS names or IP addresses) and one client certificate per name in ``clients``."""

    out: Path
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    clients: tuple[str, ...] = ("device",)
    days: int = 365

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.days < 1:
            raise ConfigError(f"invalid days={self.days}: must be >= 1")
        if not self.hosts:
            raise ConfigError("invalid hosts=(): the server certificate needs at least one host name or address")
        for name in self.clients:
            if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ConfigError(f"invalid client name {name!r}: use letters, digits, '.', '-' and '_'")
            if name in (CA_NAME, SERVER_NAME):
                raise ConfigError(f"invalid client name {name!r}: {CA_NAME!r} and {SERVER_NAME!r} are taken")
        if len(set(self.clients)) != len(self.clients):
            raise ConfigError(f"invalid clients={self.clients!r}: names must be unique")


def make_certs(config: CertsConfig) -> dict[str, Path]:
    """Write ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` and ``NAME.pem``/``NAME.key`` per client into
    ``config.out``; returns the files by role ("ca", "ca_key", "server", "server_key", then client names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=config.days)
    ca_cert, ca_key = _load_ca(out)
    if ca_cert is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeft development CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        _write(out / f"{CA_NAME}.pem", _pem_cert(ca_cert), private=False)
        _write(out / f"{CA_NAME}.key", _pem_key(ca_key), private=True)

    def leaf(common_name: str, usage, sans: list | None):  # noqa: ANN001, ANN202
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    files = {"ca": out / f"{CA_NAME}.pem", "ca_key": out / f"{CA_NAME}.key"}
    cert, key = leaf(config.hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, [_san(h) for h in config.hosts])
    files["server"], files["server_key"] = _write_pair(out, SERVER_NAME, cert, key)
    for name in config.clients:
        cert, key = leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        files[name], files[f"{name}_key"] = _write_pair(out, name, cert, key)
    return files


def _load_ca(out: Path):  # noqa: ANN202
    """An existing CA in ``out`` (both files), or (None, None)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_path, key_path = out / f"{CA_NAME}.pem", out / f"{CA_NAME}.key"
    if not cert_path.exists() and not key_path.exists():
        return None, None
    if not (cert_path.is_file() and key_path.is_file()):
        raise ConfigError(f"{out} holds only one of {CA_NAME}.pem and {CA_NAME}.key; remove it or add the other")
    try:
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), load_pem_private_key(key_path.read_bytes(), None)
    except ValueError as exc:
        raise ConfigError(f"cannot read the CA in {out} ({exc}); remove {CA_NAME}.pem and {CA_NAME}.key to make a "
                          "new one") from exc


def _san(host: str):  # noqa: ANN202
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_cert(cert) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)


def _pem_key(key) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _write_pair(out: Path, name: str, cert, key) -> tuple[Path, Path]:  # noqa: ANN001
    _write(out / f"{name}.pem", _pem_cert(cert), private=False)
    _write(out / f"{name}.key", _pem_key(key), private=True)
    return out / f"{name}.pem", out / f"{name}.key"


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; private files are created 0600 (never readable by others, not even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """gRPC server credentials from ``[server.tls]``: the certificate must be current and match the key;
    with ``client_ca``, clients must present a certificate signed by that CA (mutual TLS)."""
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    def read(name: str, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"invalid tls.{name}={str(path)!r}: cannot read it ({exc.strerror})") from exc
        if b"-----BEGIN" not in data:
            raise ConfigError(f"invalid tls.{name}={str(path)!r}: not a PEM file")
        return data

    cert_pem, key_pem = read("cert", tls.cert), read("key", tls.key)
    ca_pem = read("client_ca", tls.client_ca) if tls.client_ca is not None else None
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
        key = load_pem_private_key(key_pem, None)
        if ca_pem is not None:
            x509.load_pem_x509_certificates(ca_pem)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the TLS files {tls.cert}, {tls.key}: {exc}") from exc
    raw = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise ConfigError(f"invalid tls.key={str(tls.key)!r}: it is not the key of the certificate {tls.cert}")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(f"invalid tls.cert={str(tls.cert)!r}: valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d}, not now")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)
