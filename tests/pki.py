"""A small test PKI built with ``cryptography``: roots, intermediates and SPIFFE leaf certificates.

    root = CA.root("test root")
    inter = root.intermediate("test intermediate")
    leaf = inter.issue("spiffe://cluster.local/ns/default/sa/web")          # ECDSA P-256, 24 h
    expired = inter.issue(spiffe, not_after=now() - timedelta(hours=1))
    leaf.write(certs_dir / "default" / "web")                               # cert-chain.pem + key.pem
    root.write_bundle(path, other_root)                                     # trust bundle (several roots)

Everything is real X.509 (signatures, validity, SAN, basic constraints), so tests exercise the same code
paths as production certificates.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PathLike = Union[str, "os.PathLike[str]"]


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomic replace (write + rename), as the identity component renews certificates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediates: List[x509.Certificate] = field(default_factory=list)

    def chain_pem(self) -> bytes:
        """Leaf first, then intermediates (the cert-chain.pem layout)."""
        return b"".join(cert_pem(c) for c in [self.cert] + self.intermediates)

    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def write(self, directory: PathLike, chain_name: str = "cert-chain.pem",
              key_name: str = "key.pem") -> Path:
        """Write ``cert-chain.pem`` and ``key.pem`` into ``directory`` (atomic replace); returns it."""
        directory = Path(directory)
        _write(directory / key_name, self.key_pem(), 0o600)
        _write(directory / chain_name, self.chain_pem())
        return directory


class CA:
    """A certificate authority: a root (self-signed) or an intermediate (signed by its parent)."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 parents: Sequence[x509.Certificate] = ()) -> None:
        self.cert = cert
        self.key = key
        self.parents = list(parents)  # issuing chain above this CA, excluding the root itself

    @classmethod
    def root(cls, name: str = "ztmesh test root", *, not_before: Optional[datetime.datetime] = None,
             not_after: Optional[datetime.datetime] = None) -> CA:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztmesh-test"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = _ca_cert(subject, key.public_key(), subject, key, not_before, not_after, path_length=None)
        return cls(cert, key)

    def intermediate(self, name: str = "ztmesh test intermediate", *,
                     not_before: Optional[datetime.datetime] = None,
                     not_after: Optional[datetime.datetime] = None) -> CA:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztmesh-test"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = _ca_cert(subject, key.public_key(), self.cert.subject, self.key, not_before, not_after,
                        path_length=0)
        above = [self.cert] + self.parents if self.is_intermediate else []
        return CA(cert, key, above)

    @property
    def is_intermediate(self) -> bool:
        return self.cert.issuer != self.cert.subject

    def issue(self, uri: Optional[str], *, not_before: Optional[datetime.datetime] = None,
              not_after: Optional[datetime.datetime] = None, key: Optional[ec.EllipticCurvePrivateKey] = None,
              dns_names: Sequence[str] = (), extra_uris: Sequence[str] = ()) -> Leaf:
        """A leaf certificate with ``uri`` (a SPIFFE ID) as URI SAN, for client and server auth.

        Defaults: valid from 5 minutes ago for 24 hours, a fresh P-256 key."""
        key = key or new_key()
        start = not_before or now() - datetime.timedelta(minutes=5)
        end = not_after or now() + datetime.timedelta(hours=24)
        if end <= start:
            start = end - datetime.timedelta(hours=1)
        sans: List[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in
                                        ([uri] if uri else []) + list(extra_uris)]
        sans += [x509.DNSName(d) for d in dns_names]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztmesh-test")]))
                   .issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start)
                   .not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                                content_commitment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
        cert = builder.sign(self.key, hashes.SHA256())
        chain = [self.cert] + self.parents if self.is_intermediate else []
        return Leaf(cert, key, chain)

    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def write_bundle(self, path: PathLike, *others: CA) -> Path:
        """A trust bundle holding this CA's certificate and those of ``others`` (several roots)."""
        path = Path(path)
        _write(path, b"".join(ca.pem() for ca in (self,) + others))
        return path


def _ca_cert(subject: x509.Name, public_key, issuer: x509.Name, signing_key,
             not_before: Optional[datetime.datetime], not_after: Optional[datetime.datetime],
             path_length: Optional[int]) -> x509.Certificate:
    start = not_before or now() - datetime.timedelta(hours=1)
    end = not_after or now() + datetime.timedelta(days=365)
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(signing_key, hashes.SHA256()))
