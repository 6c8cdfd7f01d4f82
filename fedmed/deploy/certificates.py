"""Development certificates and site keys. For trials only: a real deployment gets its
server certificate from the hospital network's or the consortium's certificate authority."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.files import write_atomic
from fedmed.run_signing import PRIVATE_KEY, PUBLIC_KEY, make_coordinator_key

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.crt", "server.key"


LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def make_dev_certificates(out_dir: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A throw-away CA and a server certificate for ``hosts`` (names or IP addresses) and
    for this machine's loopback names, which the coordinator's own SuperLink dials (Flower
    reaches its runtime API on 127.0.0.1 over the same TLS); and the coordinator's key pair
    for signing run settings (``fedmed.run_signing``)."""
    if not hosts:
        raise ValueError("give at least one host name or IP address for the server certificate")
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmed development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    write_atomic(paths[CA_CERT], ca_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(paths[SERVER_CERT], server_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(paths[SERVER_KEY], _private_pem(server_key))
    paths[SERVER_KEY].chmod(0o600)
    paths[PRIVATE_KEY], paths[PUBLIC_KEY] = make_coordinator_key(out_dir)
    # The CA key is not kept: nobody can sign more certificates with this throw-away CA.
    return paths


def make_site_key(out_dir: Path, site: str) -> tuple[Path, Path]:
    """An EC key pair for SuperNode authentication (OpenSSH format, as Flower expects)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = out_dir / f"{site}.key"
    public = out_dir / f"{site}.pub"
    write_atomic(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    private.chmod(0o600)
    write_atomic(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
    )
    return private, public


def _private_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
