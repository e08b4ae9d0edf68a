"""A deployment's keys: a CA, the SuperLink's TLS certificate (for the names and addresses nodes will dial) and one
EC P-384 key pair per node (OpenSSH format: what `flwr supernode register` and `--auth-supernode-private-key`
take), made with `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgen.runtimes.flower.deploy.common import DeploymentError, need_file


def write_certs(out: Path, nodes: int, hosts: list[str] | None = None, days: int = 365) -> list[Path]:
    """CA (ca.crt, ca.key), the SuperLink's certificate (superlink.crt, superlink.key) valid for localhost,
    127.0.0.1 and `hosts`, and node-1..node-N key pairs (node-i private, node-i.pub public)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    written: list[Path] = []

    def write(name: str, data: bytes, mode: int = 0o600) -> None:
        path = out / name
        path.write_bytes(data)
        path.chmod(mode)
        written.append(path)

    def pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgen CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    write("ca.key", pem(ca_key))
    write("ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)

    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *(hosts or [])]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hosts or ["localhost"])[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write("superlink.key", pem(key))
    write("superlink.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)

    for i in range(1, nodes + 1):
        node = ec.generate_private_key(ec.SECP384R1())
        write(f"node-{i}", node.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        write(f"node-{i}.pub", node.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH), 0o644)
    return written


def check_node_key(key: Path) -> None:
    """The node's private key must be an EC key in OpenSSH format (what flower-supernode loads)."""

    need_file(key, "node key")
    try:
        loaded = load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"{key} is not an OpenSSH private key ({exc})") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{key} is not an elliptic-curve key (SuperNode authentication needs EC)")
