"""TLS certificates for the SuperLink and authentication keys for SuperNodes, made with `cryptography`.

- :func:`make_ca`: a self-signed certificate authority (``ca.crt``, ``ca.key``).
- :func:`make_server_certificate`: the SuperLink's certificate (``server.pem``,
  ``server.key``) signed by that CA, with a subject alternative name for every
  host name or IP address the nodes and the ``flwr`` CLI will dial.
- :func:`make_node_key`: a SuperNode's ECDSA P-384 key pair in OpenSSH format
  (``NAME`` and ``NAME.pub``), the format ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read.

Private keys are written with mode 0600; nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


class CredentialError(ValueError):
    """Credentials cannot be made or read as asked."""


@dataclass(frozen=True)
class ServerCredentials:
    """The files the SuperLink (certificate, key, CA) and its clients (CA) need."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


def _write(path: Path, data: bytes, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CredentialError(f"{path} exists; remove it or pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, unencrypted = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, unencrypted)


def _subject_alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:"):
                raise CredentialError(f"{host!r} is neither an IP address nor a host name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path, name: str = "fedslim CA", days: int = 3650, overwrite: bool = False) -> Path:
    """A self-signed CA in ``out`` (``ca.crt``, ``ca.key``); returns the certificate's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    _write(out / CA_KEY, _private_pem(key), private=True, overwrite=overwrite)
    _write(out / CA_CERT, certificate.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    return out / CA_CERT


def make_server_certificate(out: Path, hosts: list[str], days: int = 825, overwrite: bool = False) -> ServerCredentials:
    """The SuperLink's certificate for ``hosts``, signed by the CA in ``out`` (made first if absent)."""
    if not hosts:
        raise CredentialError("the server certificate needs at least one host name or IP address")
    if not (out / CA_CERT).exists():
        make_ca(out)
    ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), None)
    ca_certificate = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{out / CA_KEY} is not an EC private key")
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / SERVER_KEY, _private_pem(key), private=True, overwrite=overwrite)
    _write(out / SERVER_CERT, certificate.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    return ServerCredentials(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY)


def make_node_key(out: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A SuperNode's ECDSA P-384 key pair: ``out/NAME`` (private, OpenSSH) and ``out/NAME.pub``."""
    if not name or "/" in name:
        raise CredentialError(f"bad node key name {name!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True, overwrite=overwrite)
    _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False, overwrite=overwrite)
    return out / name, out / f"{name}.pub"
