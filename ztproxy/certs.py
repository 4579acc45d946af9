"""Workload certificates, TLS contexts and SPIFFE identity checks.

Files (written by the identity component, replaced atomically on renewal):
``<certs_dir>/<namespace>/<service-account>/cert-chain.pem`` (leaf first, then intermediates),
``.../key.pem``, and the trust bundle (PEM, one or more roots). The CertStore re-reads them when they
change: new TLS connections use the new certificate, open ones keep theirs; a bad new certificate is
reported and the previous valid one stays in use.

Revocation: a CertStore may carry a ``revocation`` check (ztproxy.identity.revocation, from the
``revocation`` settings). Every TLS context it builds refers back to the store, and ``tls_problem``,
which both HBONE ends call right after the handshake, refuses a peer whose certificate the check names,
so a revoked certificate is refused before any HTTP/2 byte, on the server and on the client side.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztproxy.identity.pki import (
    CHAIN_FILE,
    KEY_FILE,
    IdentityError,
    SpiffeId,
    load_certs,
    not_after,
    not_before,
    signed_by,
    spiffe_uris,
)
from ztproxy.state import file_signature

log = logging.getLogger("ztproxy.certs")

# HBONE as ztunnel: TLS 1.3 with these suites only, ALPN h2.
ALLOWED_CIPHERS = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
ALPN = "h2"

# Why a peer certificate (DER) must be refused before it expires, or None (RevocationList.check).
RevocationCheck = Callable[[bytes], Optional[str]]


class CertError(Exception):
    """A certificate, key or trust bundle that cannot be used; the message says which file and why."""


def load_pem_certs(path: str, what: str) -> List[x509.Certificate]:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise CertError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return load_certs(data, f"{what} {path}")
    except IdentityError as exc:
        raise CertError(str(exc)) from None


def load_trust_bundle(path: str) -> List[x509.Certificate]:
    return load_pem_certs(path, "trust bundle")


def _check_validity(cert: x509.Certificate, path: str, now: datetime.datetime) -> None:
    start, end = not_before(cert), not_after(cert)
    if now < start:
        raise CertError(f"certificate {cert.subject.rfc4514_string()!r} in {path} is not valid before "
                        f"{start.isoformat()}")
    if now > end:
        raise CertError(f"certificate {cert.subject.rfc4514_string()!r} in {path} expired at "
                        f"{end.isoformat()}; renew it")


@dataclass(frozen=True)
class IdentityFiles:
    cert_chain: str
    key: str

    @classmethod
    def under(cls, certs_dir: str, namespace: str, service_account: str) -> IdentityFiles:
        base = os.path.join(certs_dir, namespace, service_account)
        return cls(os.path.join(base, CHAIN_FILE), os.path.join(base, KEY_FILE))


def validate_identity(files: IdentityFiles, bundle_path: str, expected_id: str,
                      now: Optional[datetime.datetime] = None) -> datetime.datetime:
    """Check that the files hold a usable certificate for ``expected_id``; returns the leaf's expiry.

    Checks: parseable chain and key, the key matches the leaf, the leaf's URI SAN is ``expected_id``,
    every certificate is within its validity period, and the chain leads to a root of the bundle.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    chain = load_pem_certs(files.cert_chain, "certificate chain")
    roots = load_trust_bundle(bundle_path)
    try:
        with open(files.key, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except OSError as exc:
        raise CertError(f"cannot read private key {files.key}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise CertError(f"private key {files.key} is not an unencrypted PEM key: {exc}") from None
    leaf = chain[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise CertError(f"private key {files.key} does not match the certificate in {files.cert_chain}")
    sans = spiffe_uris(leaf)
    if expected_id not in sans:
        raise CertError(f"certificate {files.cert_chain} is for {', '.join(sans) or 'no SPIFFE ID'}, "
                        f"expected URI SAN {expected_id}")
    for cert in chain:
        _check_validity(cert, files.cert_chain, now)
    # Walk the chain: each certificate must be signed by the next, the last by a root of the bundle.
    for child, parent in zip(chain, chain[1:]):
        if not signed_by(child, parent):
            raise CertError(f"certificate chain {files.cert_chain} is out of order or broken: "
                            f"{child.subject.rfc4514_string()!r} is not signed by the next certificate")
    top = chain[-1]
    anchors = [r for r in roots if signed_by(top, r) or r == top]
    if not anchors:
        raise CertError(f"certificate chain {files.cert_chain} does not lead to any root in the trust "
                        f"bundle {bundle_path}")
    for root in anchors:
        _check_validity(root, bundle_path, now)
    return not_after(leaf)


class HboneContext(ssl.SSLContext):
    """An SSLContext that knows how to check the peer certificates it accepts for revocation (the ssl
    module verifies chains and validity but has no revocation hook for our deny list and CRLs)."""

    peer_check: Optional[RevocationCheck] = None


def _base_context(purpose: ssl.Purpose, files: IdentityFiles, bundle_path: str,
                  peer_check: Optional[RevocationCheck] = None) -> ssl.SSLContext:
    ctx = HboneContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                       else ssl.PROTOCOL_TLS_CLIENT)
    ctx.peer_check = peer_check
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # SPIFFE identities are checked on the URI SAN after the handshake, not as host names.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=bundle_path)
    ctx.load_cert_chain(files.cert_chain, files.key)
    ctx.set_alpn_protocols([ALPN])
    ctx.options |= ssl.OP_NO_COMPRESSION
    # No session tickets: no resumption across certificate rotations, simpler to reason about.
    ctx.options |= getattr(ssl, "OP_NO_TICKET", 0)
    return ctx


def tls_problem(ssl_object: ssl.SSLObject) -> Optional[str]:
    """Why a finished handshake does not meet HBONE's requirements, or None.

    Python's ssl module cannot restrict the TLS 1.3 cipher suites, so the suite is checked here and
    a connection that negotiated another one (e.g. CHACHA20) is closed before any HTTP/2 byte.
    """
    if ssl_object.version() != "TLSv1.3":
        return f"TLS version {ssl_object.version()} (TLSv1.3 required)"
    cipher = (ssl_object.cipher() or ("?",))[0]
    if cipher not in ALLOWED_CIPHERS:
        return f"cipher suite {cipher} (allowed: {', '.join(ALLOWED_CIPHERS)})"
    if ssl_object.selected_alpn_protocol() != ALPN:
        return f"ALPN {ssl_object.selected_alpn_protocol()!r} ('h2' required)"
    peer_check = getattr(ssl_object.context, "peer_check", None)
    if peer_check is not None:
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return "the peer presented no certificate"
        reason = peer_check(der)
        if reason is not None:
            return f"peer certificate refused: {reason}"
    return None


def peer_spiffe_ids(ssl_object: ssl.SSLObject) -> List[str]:
    cert = ssl_object.getpeercert()
    if not cert:
        return []
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def peer_identity_in_domain(ssl_object: ssl.SSLObject, trust_domain: str) -> Optional[str]:
    """The peer's SPIFFE ID if it belongs to ``trust_domain``, else None."""
    for uri in peer_spiffe_ids(ssl_object):
        try:
            if SpiffeId.parse(uri).trust_domain == trust_domain:
                return uri
        except IdentityError:
            continue
    return None


@dataclass
class IdentityContexts:
    identity: str
    client: ssl.SSLContext
    server: ssl.SSLContext
    expires: datetime.datetime
    generation: int


class CertStore:
    """TLS contexts per local identity, rebuilt when the certificate files change."""

    def __init__(self, certs_dir: str, bundle_path: str,
                 revocation: Optional[RevocationCheck] = None) -> None:
        self.certs_dir = certs_dir
        self.bundle_path = bundle_path
        # Set (or replaced) at any time: contexts built earlier consult it through check_peer().
        self.revocation = revocation
        self._entries: Dict[str, IdentityContexts] = {}
        self._signatures: Dict[str, tuple] = {}
        self._failed: Dict[str, tuple] = {}
        self._generation = 0

    def _files(self, identity: str) -> IdentityFiles:
        try:
            parsed = SpiffeId.parse(identity)
        except IdentityError as exc:
            raise CertError(str(exc)) from None
        return IdentityFiles.under(self.certs_dir, parsed.namespace, parsed.service_account)

    def _signature(self, files: IdentityFiles) -> tuple:
        return (file_signature(files.cert_chain), file_signature(files.key),
                file_signature(self.bundle_path))

    def _load(self, identity: str) -> IdentityContexts:
        files = self._files(identity)
        signature = self._signature(files)
        expires = validate_identity(files, self.bundle_path, identity)
        try:
            client = _base_context(ssl.Purpose.SERVER_AUTH, files, self.bundle_path, self.check_peer)
            server = _base_context(ssl.Purpose.CLIENT_AUTH, files, self.bundle_path, self.check_peer)
        except (ssl.SSLError, OSError) as exc:
            raise CertError(f"cannot load {files.cert_chain} / {files.key} into TLS: {exc}") from None
        self._generation += 1
        self._signatures[identity] = signature
        return IdentityContexts(identity, client, server, expires, self._generation)

    def check_peer(self, der: bytes) -> Optional[str]:
        """Why the peer certificate ``der`` is revoked, or None (also None without a revocation check)."""
        if self.revocation is None:
            return None
        try:
            return self.revocation(der)
        except Exception as exc:  # fail closed: a certificate we cannot check is not accepted
            log.error("revocation check failed: %s", exc)
            return f"its revocation status cannot be checked ({exc})"

    def get(self, identity: str) -> IdentityContexts:
        """The contexts for ``identity``, loading them on first use; raises CertError if unusable."""
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._load(identity)
            self._entries[identity] = entry
            log.info("loaded certificate for %s (expires %s)", identity, entry.expires.isoformat())
        return entry

    def refresh(self) -> None:
        """Rebuild contexts whose files changed; keep the previous ones when the new files are bad."""
        for identity, entry in list(self._entries.items()):
            files = self._files(identity)
            signature = self._signature(files)
            if signature == self._signatures.get(identity) or signature == self._failed.get(identity):
                continue
            try:
                self._entries[identity] = self._load(identity)
            except CertError as exc:
                self._failed[identity] = signature
                log.error("new certificate for %s rejected, keeping the previous one (expires %s): %s",
                          identity, entry.expires.isoformat(), exc)
                continue
            self._failed.pop(identity, None)
            log.info("certificate for %s reloaded (expires %s)", identity,
                     self._entries[identity].expires.isoformat())
