"""TLS for the broker: a certificate authority of the grid's own and the certificate it signs
for the broker's servers (Redis and its sentinels), made with ``cryptography``.

    files = ensure_tls(home / "broker" / "tls", ["redis", "localhost", "127.0.0.1"])
    # redis-server --port 0 --tls-port 6379 --tls-cert-file <files.server_cert> --tls-key-file <files.server_key> \\
    #     --tls-ca-cert-file <files.ca_cert> --tls-auth-clients no        (ops.redis_servers.tls_arguments)
    # every participant: rediss://USER:PASSWORD@redis:6379/0?ssl_ca_certs=/path/to/ca.crt

In ``folder`` (0700):

* ``ca.crt``: the CA's certificate. Public: hand it to every participant, at other sites too
  (docker compose's ``init`` copies it to ``deploy/tls/ca.crt``); a client trusts the broker
  only if its certificate chains to it (``ssl_ca_certs`` in the broker URL).
* ``ca.key`` (0600): signs; it never leaves the broker's host.
* ``server.crt``, ``server.key`` (0600): what Redis and the sentinels present. The
  certificate names every host name and address participants connect by (a client checks
  the name it dialled against it).

Clients log in with their ACL user's password (``ops/acl.py``), not a client certificate:
the servers run with ``tls-auth-clients no``. Idempotent: the CA is kept (participants keep
trusting it); the server certificate is made again when it lacks a name asked for, or ends
within :data:`RENEW_BEFORE_DAYS` days.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # what browsers and most TLS stacks accept for a leaf certificate
RENEW_BEFORE_DAYS = 30
CA_NAME = "gridq broker CA"


@dataclass(frozen=True)
class TlsFiles:
    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    names: tuple[str, ...]


def tls_files(folder: Path) -> TlsFiles:
    """Where :func:`ensure_tls` keeps its files in ``folder`` (whether or not they exist yet)."""
    folder = Path(folder)
    return TlsFiles(folder, folder / "ca.crt", folder / "ca.key", folder / "server.crt", folder / "server.key", ())


def ensure_tls(folder: Path, names: Sequence[str]) -> TlsFiles:
    """The grid's CA (made once) and a server certificate naming every one of ``names`` (host
    names and IP addresses), in ``folder``."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if not names:
        raise ValueError("a server certificate must name at least one host (a host name or an address)")
    files = tls_files(folder)
    files.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(files.folder, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    if files.ca_cert.exists() and files.ca_key.exists():
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False),
                             critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        _write(files.ca_key, _private_pem(ca_key), 0o600)
        _write(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{files.ca_key} is not the EC key gridq makes")
    if not _current(files, names, ca, now):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
                .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                             crl_sign=False, content_commitment=False, data_encipherment=False,
                                             key_agreement=True, encipher_only=False, decipher_only=False),
                               critical=True)
                # server: Redis and the sentinels present it; client: the same servers dial each other
                # (a replica its primary, a sentinel the servers) and show it when asked
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(files.server_key, _private_pem(key), 0o600)
        _write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return TlsFiles(files.folder, files.ca_cert, files.ca_key, files.server_cert, files.server_key, names)


def certificate_names(path: Path) -> list[str]:
    """The host names and addresses a certificate names (its subject alternative names)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + \
        [str(n) for n in san.get_values_for_type(x509.IPAddress)]


def _current(files: TlsFiles, names: tuple[str, ...], ca: x509.Certificate, now: datetime.datetime) -> bool:
    """Whether the server certificate there is the CA's, names all of ``names`` and is not about to end."""
    if not (files.server_cert.exists() and files.server_key.exists()):
        return False
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    if cert.issuer != ca.subject or cert.not_valid_after_utc - now < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure (another CA's, another key type): made again
        return False
    have = {n.lower() for n in certificate_names(files.server_cert)}
    return set(names) <= have


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
