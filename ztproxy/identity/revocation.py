"""Refusing certificates before they expire: a deny list and CRLs, checked at every mTLS handshake.

Two sources, both optional, both re-read when their files change:

* the **deny list** (YAML, rendered from the inventory next to the mesh state; docs/identity.md)::

      serials: ["3f0c9a..."]                 # hex, as `ztproxy cert show` prints them
      spiffeIds: ["spiffe://cluster.local/ns/shop/sa/cart"]
      nodes: ["web-3"]                       # the node identity .../ns/ztmesh-system/sa/node-web-3

* **CRL files** (PEM or DER) signed by a CA certificate of the trust bundle or of a given chain file:
  a CRL whose signature does not verify is ignored with an error (it could only be a forgery or a
  mistake, and must not be able to revoke anything).

``RevocationList.check(cert)`` returns the reason a certificate is refused, or None; ``is_revoked`` is
the boolean form the HBONE handshake calls. A deny list that cannot be parsed keeps the previous one.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .pki import (
    NODE_NAMESPACE,
    NODE_SA_PREFIX,
    CaMaterial,
    IdentityError,
    identity_of,
    load_certs,
    serial_hex,
    utcnow,
)

log = logging.getLogger("ztproxy.identity.revocation")

CertLike = Union[x509.Certificate, bytes]


@dataclass(frozen=True)
class DenyList:
    serials: FrozenSet[int] = frozenset()
    spiffe_ids: FrozenSet[str] = frozenset()
    nodes: FrozenSet[str] = frozenset()


def parse_deny_list(text: str, source: str = "deny list") -> DenyList:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise IdentityError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise IdentityError(f"{source} must be a mapping with 'serials', 'spiffeIds' and/or 'nodes'")
    unknown = set(data) - {"serials", "spiffeIds", "nodes"}
    if unknown:
        raise IdentityError(f"{source} has unknown keys {sorted(unknown)}: use serials, spiffeIds, nodes")
    serials = set()
    for value in data.get("serials") or []:
        text_value = str(value).lower().replace(":", "")
        text_value = text_value[2:] if text_value.startswith("0x") else text_value
        try:
            serials.add(int(text_value, 16))
        except ValueError as exc:
            raise IdentityError(
                f"serial {value!r} in {source} is not hexadecimal (write it as `ztproxy cert show` prints it)"
            ) from exc
    return DenyList(
        serials=frozenset(serials),
        spiffe_ids=frozenset(str(v) for v in data.get("spiffeIds") or []),
        nodes=frozenset(str(v) for v in data.get("nodes") or []),
    )


def _load_crl(data: bytes):
    if b"-----BEGIN X509 CRL-----" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def _signature(paths: Iterable[str]) -> Tuple:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((path, None))
    return tuple(out)


@dataclass
class RevocationList:
    """Deny list + CRLs; cheap to call per handshake (files are stat'ed at most every ``min_interval``)."""

    deny_list_path: Optional[str] = None
    crl_paths: Sequence[str] = ()
    # PEM files holding the CA certificates allowed to sign CRLs (trust bundle, a cert-chain.pem...).
    crl_issuer_paths: Sequence[str] = ()
    min_interval: float = 1.0
    _deny: DenyList = field(default_factory=DenyList)
    _revoked: Dict[bytes, FrozenSet[int]] = field(default_factory=dict)  # issuer DER name -> serials
    _seen: Optional[Tuple] = None
    _checked_at: float = 0.0

    def __post_init__(self) -> None:
        self.reload(strict=True)

    def reload(self, strict: bool = False) -> None:
        """Re-read the files if they changed. ``strict`` (first load) raises instead of keeping the old."""
        now = time.monotonic()
        if not strict and now - self._checked_at < self.min_interval:
            return
        self._checked_at = now
        paths = (
            ([self.deny_list_path] if self.deny_list_path else [])
            + list(self.crl_paths)
            + list(self.crl_issuer_paths)
        )
        signature = _signature(paths)
        if signature == self._seen:
            return
        self._seen = signature
        if self.deny_list_path:
            try:
                with open(self.deny_list_path, encoding="utf-8") as handle:
                    self._deny = parse_deny_list(handle.read(), self.deny_list_path)
            except FileNotFoundError:
                self._deny = DenyList()  # no file = nothing denied (the role creates it when needed)
            except (OSError, IdentityError) as exc:
                if strict:
                    raise IdentityError(str(exc)) from exc
                log.error("keeping the previous deny list: %s", exc)
        self._revoked = self._load_crls(strict)

    def _load_crls(self, strict: bool) -> Dict[bytes, FrozenSet[int]]:
        issuers: List[x509.Certificate] = []
        for path in self.crl_issuer_paths:
            try:
                with open(path, "rb") as handle:
                    issuers.extend(load_certs(handle.read(), path))
            except (OSError, IdentityError) as exc:
                log.error("cannot read CRL issuers from %s: %s", path, exc)
        revoked: Dict[bytes, FrozenSet[int]] = {}
        for path in self.crl_paths:
            try:
                with open(path, "rb") as handle:
                    crl = _load_crl(handle.read())
            except (OSError, ValueError) as exc:
                if strict:
                    raise IdentityError(f"CRL {path} cannot be read: {exc}") from exc
                log.error("ignoring CRL %s: %s", path, exc)
                continue
            signer = next(
                (c for c in issuers if c.subject == crl.issuer and crl.is_signature_valid(c.public_key())),
                None,
            )
            if signer is None:
                message = (
                    f"CRL {path} (issuer {crl.issuer.rfc4514_string()}) is not signed by any CA certificate "
                    f"of {', '.join(self.crl_issuer_paths) or '(no CRL issuers configured)'}"
                )
                if strict:
                    raise IdentityError(message)
                log.error("ignoring %s", message)
                continue
            key = crl.issuer.public_bytes()
            revoked[key] = frozenset(revoked.get(key, frozenset()) | {entry.serial_number for entry in crl})
        return revoked

    def check(self, cert: CertLike) -> Optional[str]:
        """Why ``cert`` (a certificate or its DER) must be refused, or None when it may be used."""
        if isinstance(cert, (bytes, bytearray)):
            cert = x509.load_der_x509_certificate(bytes(cert))
        self.reload()
        serial = cert.serial_number
        if serial in self._deny.serials:
            return f"serial {serial_hex(cert)} is on the deny list"
        identity = identity_of(cert)
        if identity is not None:
            if str(identity) in self._deny.spiffe_ids:
                return f"{identity} is on the deny list"
            if (
                identity.namespace == NODE_NAMESPACE
                and identity.service_account.startswith(NODE_SA_PREFIX)
                and identity.service_account[len(NODE_SA_PREFIX) :] in self._deny.nodes
            ):
                return f"node {identity.node_name} is on the deny list"
        if serial in self._revoked.get(cert.issuer.public_bytes(), frozenset()):
            return f"serial {serial_hex(cert)} is revoked by a CRL of {cert.issuer.rfc4514_string()}"
        return None

    def is_revoked(self, cert: CertLike) -> bool:
        reason = self.check(cert)
        if reason:
            log.warning("refusing certificate: %s", reason)
        return reason is not None


def make_crl(ca: CaMaterial, serials: Iterable[int], days: int = 7) -> bytes:
    """A PEM CRL signed by the signing CA, revoking ``serials`` (for `ztproxy ca crl`)."""
    now = utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.signing_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=days))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca.signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
