"""SPIFFE X.509 for ztmesh: identities, keys and CSRs, certificate inspection, chain checks, CA material.

This one file is shared by ztproxy and by the Ansible modules: ``module_utils/ztmesh_identity.py`` is a
symlink to it, so Ansible ships exactly this code to the nodes. It must therefore stay self-contained
(standard library and ``cryptography`` only, nothing else from ztproxy), run on Python 3.9 and on the
``cryptography`` of the oldest supported distribution (3.4, RHEL 9 ships 36).

Certificates mirror what istiod issues (istio/security/pkg/pki/util/generate_cert.go), so that real
ztunnel and Envoy accept ours and ours accept theirs: empty subject, the SPIFFE ID as the only URI SAN
(critical, since the subject is empty), key usage digitalSignature+keyEncipherment, extended key usage
serverAuth+clientAuth, basicConstraints CA:FALSE, authority and subject key identifiers, a 128-bit random
serial, and a not-before set back a little to absorb clock skew between nodes.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# ---------------------------------------------------------------------------------------------------
# Defaults: every identity default of ztmesh lives here.
# ---------------------------------------------------------------------------------------------------
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CERT_TTL = 24 * 3600  # seconds; istiod's default workload certificate lifetime
MAX_CERT_TTL = 90 * 24 * 3600  # istiod's default maximum
DEFAULT_RENEW_FRACTION = 0.5  # renew when half the lifetime has passed (ztunnel does the same)
# istiod backdates not-before by 2 minutes. Short test certificates (seconds) get 10 % of their lifetime
# instead, so "half-life" stays meaningful for them.
CLOCK_SKEW_GRACE = 120
DEFAULT_ROOT_TTL_DAYS = 3650
DEFAULT_INTERMEDIATE_TTL_DAYS = 365
DEFAULT_CA_ORGANIZATION = "ztmesh"
# Node identities: spiffe://<td>/ns/ztmesh-system/sa/node-<nodeName> (docs/identity.md).
NODE_NAMESPACE = "ztmesh-system"
NODE_SA_PREFIX = "node-"
# The signing service's own server identity.
CA_SERVICE_ACCOUNT = "ztmesh-ca"
DEFAULT_CA_PORT = 15012  # istiod serves its CA on 15012 too

# Istio's plug-in CA layout (what `kubectl create secret generic cacerts` takes), plus the root key that
# `ca init` keeps so a new intermediate can be cut later. A user-supplied CA has no root key.
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
ROOT_CERT_FILE = "root-cert.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_KEY_FILE = "root-key.pem"

# Per-identity files on a node: <certs_dir>/<namespace>/<service-account>/{cert-chain.pem,key.pem}.
CHAIN_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"
KEY_MODE = 0o600
CERT_MODE = 0o644

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class IdentityError(Exception):
    """Bad identity material; the message tells the operator what is wrong and what to do."""


class CaError(IdentityError):
    """CA material that cannot be used for signing."""


# ---------------------------------------------------------------------------------------------------
# SPIFFE IDs
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>`` (Istio's form), with an operator-grade error."""
        prefix = "spiffe://"
        if not isinstance(text, str) or not text.startswith(prefix):
            raise IdentityError(
                f"{text!r} is not a SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/"
                "<service-account>"
            )
        parts = text[len(prefix) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(
                f"{text!r} is not an Istio SPIFFE ID: expected spiffe://<trust-domain>/ns/"
                "<namespace>/sa/<service-account>"
            )
        return cls.of(parts[0], parts[2], parts[4])

    @classmethod
    def of(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        check_trust_domain(trust_domain)
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if not value or not _SEGMENT_RE.match(value) or value in (".", ".."):
                raise IdentityError(
                    f"{what} {value!r} is not valid in a SPIFFE ID: use letters, digits, "
                    "'.', '-' and '_' only"
                )
        return cls(trust_domain, namespace, service_account)

    @property
    def is_node(self) -> bool:
        return self.namespace == NODE_NAMESPACE and self.service_account.startswith(NODE_SA_PREFIX)

    @property
    def node_name(self) -> Optional[str]:
        return self.service_account[len(NODE_SA_PREFIX) :] if self.is_node else None


def check_trust_domain(trust_domain: str) -> str:
    if not trust_domain or not _TRUST_DOMAIN_RE.match(trust_domain) or len(trust_domain) > 255:
        raise IdentityError(
            f"trust domain {trust_domain!r} is not valid: use lower-case letters, digits, "
            "'.', '-' and '_' (for example cluster.local)"
        )
    return trust_domain


def node_identity(trust_domain: str, node_name: str) -> SpiffeId:
    """The identity a node uses to authenticate to the signing service (docs/identity.md)."""
    return SpiffeId.of(trust_domain, NODE_NAMESPACE, NODE_SA_PREFIX + node_name)


def ca_service_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId.of(trust_domain, NODE_NAMESPACE, CA_SERVICE_ACCOUNT)


# ---------------------------------------------------------------------------------------------------
# PEM and time helpers (portable across cryptography 3.4 .. current)
# ---------------------------------------------------------------------------------------------------
_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL)
_UTC = datetime.timezone.utc


def load_certs(data: bytes | str, what: str = "PEM data") -> List[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; a clear error if there is none or one is broken."""
    if isinstance(data, str):
        data = data.encode()
    blocks = _PEM_CERT_RE.findall(data)
    if not blocks:
        raise IdentityError(f"{what} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----')")
    certs = []
    for index, block in enumerate(blocks):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise IdentityError(f"certificate #{index + 1} in {what} cannot be parsed: {exc}") from exc
    return certs


def load_cert_file(path: str) -> List[x509.Certificate]:
    try:
        with open(path, "rb") as handle:
            return load_certs(handle.read(), path)
    except FileNotFoundError as exc:
        raise IdentityError(f"{path} does not exist") from exc


def load_key(data: bytes | str, what: str = "private key"):
    if isinstance(data, str):
        data = data.encode()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"{what} is not an unencrypted PEM private key ({exc}); ztmesh needs the key without a passphrase"
        ) from exc


def load_key_file(path: str):
    try:
        with open(path, "rb") as handle:
            return load_key(handle.read(), path)
    except FileNotFoundError as exc:
        raise IdentityError(f"{path} does not exist") from exc


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def certs_pem(certs: Iterable[x509.Certificate]) -> str:
    return "".join(cert_pem(c) for c in certs)


def key_pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def not_before(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    return value if value is not None else cert.not_valid_before.replace(tzinfo=_UTC)


def not_after(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=_UTC)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(_UTC)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def public_key_der(key_or_cert) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches_cert(key, cert: x509.Certificate) -> bool:
    return public_key_der(key) == public_key_der(cert)


def _extension(cert_or_csr, oid):
    try:
        return cert_or_csr.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None


def spiffe_uris(cert_or_csr) -> List[str]:
    san = _extension(cert_or_csr, x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if san is None:
        return []
    return [
        uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")
    ]


def identity_of(cert: x509.Certificate) -> Optional[SpiffeId]:
    """The certificate's SPIFFE ID; None when it has none, several, or one not in Istio's form."""
    uris = spiffe_uris(cert)
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except IdentityError:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    constraints = _extension(cert, x509.oid.ExtensionOID.BASIC_CONSTRAINTS)
    if constraints is None or not constraints.ca:
        return False
    usage = _extension(cert, x509.oid.ExtensionOID.KEY_USAGE)
    return usage is None or usage.key_cert_sign


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and signed_by(cert, cert)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s key made ``cert``'s signature (and the names chain)."""
    if cert.issuer != issuer.subject:
        return False
    try:
        if hasattr(cert, "verify_directly_issued_by"):  # cryptography >= 40: every algorithm it knows
            cert.verify_directly_issued_by(issuer)
            return True
        public = issuer.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
            )
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        else:  # Ed25519/Ed448: no hash parameter
            public.verify(cert.signature, cert.tbs_certificate_bytes)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Chain verification (used before installing anything, and by `cert show`)
# ---------------------------------------------------------------------------------------------------
def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: Optional[datetime.datetime] = None,
) -> List[x509.Certificate]:
    """Check that ``leaf`` chains through ``intermediates`` to one of ``roots``, every certificate valid at
    ``at``; return the path (leaf first, root last). Raise IdentityError saying which link is broken."""
    at = at or utcnow()
    path = [leaf]
    current = leaf
    pool = list(intermediates)
    for _depth in range(10):
        _check_time(current, at)
        for root in roots:
            if signed_by(current, root):
                _check_time(root, at)
                if current is not leaf or not is_self_signed(leaf):
                    path.append(root)
                return path
        issuer = next((c for c in pool if c is not current and signed_by(current, c)), None)
        if issuer is None:
            raise IdentityError(
                f"certificate {describe(current)} was not issued by any certificate of the chain "
                "or of the trust bundle: the chain does not lead to a trusted root (is the trust "
                "bundle the root of the CA that signed it?)"
            )
        if not is_ca(issuer):
            raise IdentityError(
                f"certificate {describe(issuer)} signed {describe(current)} but is not a CA "
                "certificate (basicConstraints CA:TRUE with keyCertSign)"
            )
        pool.remove(issuer)
        path.append(issuer)
        current = issuer
    raise IdentityError("certificate chain is longer than 10 certificates")


def _check_time(cert: x509.Certificate, at: datetime.datetime) -> None:
    if at < not_before(cert):
        raise IdentityError(
            f"certificate {describe(cert)} is not valid before {not_before(cert).isoformat()} "
            "(check the clocks)"
        )
    if at >= not_after(cert):
        raise IdentityError(f"certificate {describe(cert)} expired at {not_after(cert).isoformat()}")


def describe(cert: x509.Certificate) -> str:
    name = identity_of(cert)
    label = str(name) if name else (cert.subject.rfc4514_string() or "(empty subject)")
    return f"'{label}' (serial {serial_hex(cert)})"


@dataclass(frozen=True)
class CertSummary:
    """What `cert show` and the modules report about one certificate."""

    identity: Optional[str]
    serial: str
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def lifetime(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    def remaining(self, at: Optional[datetime.datetime] = None) -> float:
        return (self.not_after - (at or utcnow())).total_seconds()

    def renew_at(self, fraction: float = DEFAULT_RENEW_FRACTION) -> datetime.datetime:
        return self.not_before + datetime.timedelta(seconds=self.lifetime * fraction)

    def as_dict(self, at: Optional[datetime.datetime] = None) -> Dict[str, object]:
        return {
            "identity": self.identity,
            "serial": self.serial,
            "issuer": self.issuer,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "lifetime_seconds": int(self.lifetime),
            "remaining_seconds": int(self.remaining(at)),
        }


def summarize(cert: x509.Certificate) -> CertSummary:
    ident = identity_of(cert)
    return CertSummary(
        identity=str(ident) if ident else None,
        serial=serial_hex(cert),
        issuer=cert.issuer.rfc4514_string(),
        not_before=not_before(cert),
        not_after=not_after(cert),
    )


# ---------------------------------------------------------------------------------------------------
# Keys and CSRs (node side; the key never leaves the node)
# ---------------------------------------------------------------------------------------------------
def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san_extension(
    identity: SpiffeId, dns_names: Sequence[str] = (), ips: Sequence = ()
) -> x509.SubjectAlternativeName:
    names: List[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ip) for ip in ips]
    return x509.SubjectAlternativeName(names)


def make_csr(key, identity: SpiffeId) -> str:
    """A PEM CSR with an empty subject and the SPIFFE ID as URI SAN (what ztunnel sends to istiod)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(_san_extension(identity), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def parse_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Load a CSR and check its proof of possession; refuse weak keys."""
    if isinstance(pem, str):
        pem = pem.encode()
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise IdentityError(f"the CSR is not a PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise IdentityError("the CSR signature does not verify (the request was not made with its own key)")
    public = csr.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in ("secp256r1", "secp384r1"):
            raise IdentityError(f"CSR key curve {public.curve.name} is not accepted: use P-256 or P-384")
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise IdentityError(f"CSR RSA key of {public.key_size} bits is too small: use at least 2048 bits")
    else:
        raise IdentityError("CSR key type is not accepted: use ECDSA P-256 (or P-384, or RSA >= 2048)")
    return csr


# ---------------------------------------------------------------------------------------------------
# CA material
# ---------------------------------------------------------------------------------------------------
@dataclass
class CaMaterial:
    """A signing CA: its certificate and key, the chain up to (not including) the root, and the roots."""

    directory: str
    signing_cert: x509.Certificate
    signing_key: object
    chain: List[x509.Certificate]  # signing cert first, then any intermediates above it
    roots: List[x509.Certificate]  # every root of root-cert.pem (several during a CA roll)
    anchor: x509.Certificate  # the root this CA chains to

    @property
    def chain_pem(self) -> str:
        return certs_pem(self.chain)

    @property
    def roots_pem(self) -> str:
        return certs_pem(self.roots)

    def summary(self) -> Dict[str, object]:
        return {
            "directory": self.directory,
            "signing_cert": summarize(self.signing_cert).as_dict(),
            "subject": self.signing_cert.subject.rfc4514_string(),
            "root_subject": self.anchor.subject.rfc4514_string(),
            "root_serial": serial_hex(self.anchor),
            "roots": len(self.roots),
        }


def _ca_file(directory: str, name: str) -> str:
    return os.path.join(directory, name)


def ca_exists(directory: str) -> bool:
    return any(os.path.exists(_ca_file(directory, f)) for f in (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE))


def load_ca(directory: str, at: Optional[datetime.datetime] = None) -> CaMaterial:
    """Load and validate CA material in Istio's plug-in layout; every refusal says what to fix."""
    at = at or utcnow()
    missing = [
        f for f in (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE) if not os.path.exists(_ca_file(directory, f))
    ]
    if missing:
        raise CaError(
            f"CA directory {directory} lacks {', '.join(missing)}: give a directory in Istio's plug-in "
            f"layout ({CA_CERT_FILE}, {CA_KEY_FILE}, {ROOT_CERT_FILE}, {CERT_CHAIN_FILE}) or let ztmesh "
            "create a CA there ('ztproxy ca init')"
        )
    ca_certs = load_cert_file(_ca_file(directory, CA_CERT_FILE))
    signing_cert = ca_certs[0]
    signing_key = load_key_file(_ca_file(directory, CA_KEY_FILE))
    roots = load_cert_file(_ca_file(directory, ROOT_CERT_FILE))
    chain_path = _ca_file(directory, CERT_CHAIN_FILE)
    chain = load_cert_file(chain_path) if os.path.exists(chain_path) else [signing_cert]

    if not key_matches_cert(signing_key, signing_cert):
        raise CaError(
            f"{CA_KEY_FILE} does not belong to {CA_CERT_FILE} in {directory} (their public keys differ): "
            "put the key that was generated with this CA certificate"
        )
    if not is_ca(signing_cert):
        raise CaError(
            f"{CA_CERT_FILE} in {directory} ({describe(signing_cert)}) is not a CA certificate: it needs "
            "basicConstraints CA:TRUE and keyCertSign; an end-entity certificate cannot sign workloads"
        )
    for root in roots:
        if not is_self_signed(root) or not is_ca(root):
            raise CaError(
                f"{ROOT_CERT_FILE} in {directory} holds {describe(root)}, which is not a self-signed CA "
                "certificate: it must hold only root certificates"
            )
    if chain[0].public_bytes(serialization.Encoding.DER) != signing_cert.public_bytes(
        serialization.Encoding.DER
    ):
        raise CaError(
            f"{CERT_CHAIN_FILE} in {directory} must start with {CA_CERT_FILE} (Istio's layout: "
            "cert-chain.pem = ca-cert.pem followed by its issuers)"
        )
    # Roots inside cert-chain.pem are allowed (Istio's tooling puts the root there) but not sent twice.
    intermediates = [c for c in chain[1:] if not is_self_signed(c)]
    try:
        path = verify_chain(signing_cert, intermediates, roots, at)
    except IdentityError as exc:
        raise CaError(f"CA in {directory} is not usable: {exc}") from exc
    anchor = path[-1]
    # A root that signs directly is allowed (small meshes): its chain is just itself.
    chain = [signing_cert] if is_self_signed(signing_cert) else path[:-1]
    return CaMaterial(
        directory=directory,
        signing_cert=signing_cert,
        signing_key=signing_key,
        chain=chain,
        roots=roots,
        anchor=anchor,
    )


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key,
    issuer_key_public,
    days: int,
    path_length: Optional[int],
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_GRACE))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key_public), critical=False)
    )
    return builder


def _serial() -> int:
    # 128 random bits like istiod, kept positive and non-zero.
    return secrets.randbits(127) | 1


def create_ca(
    directory: str,
    organization: str = DEFAULT_CA_ORGANIZATION,
    root_days: int = DEFAULT_ROOT_TTL_DAYS,
    intermediate_days: int = DEFAULT_INTERMEDIATE_TTL_DAYS,
    root_cn: str = "ztmesh root CA",
    root_key=None,
    root_cert: Optional[x509.Certificate] = None,
) -> CaMaterial:
    """Create a root (unless one is given) and an intermediate that signs, in Istio's plug-in layout.

    Keys are written 0600 and never overwritten: an existing CA in ``directory`` is an error."""
    if ca_exists(directory):
        raise CaError(
            f"{directory} already holds CA material; refusing to overwrite it (use another directory "
            "for a new CA)"
        )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    now = utcnow()
    if root_key is None:
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"{root_cn} {now.strftime('%Y-%m-%d')} {secrets.token_hex(3)}"
                ),
            ]
        )
        root_cert = _ca_builder(
            root_name, root_name, root_key.public_key(), root_key.public_key(), root_days, None, now
        ).sign(root_key, hashes.SHA384())
    assert root_cert is not None
    int_key = ec.generate_private_key(ec.SECP256R1())
    int_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"ztmesh intermediate CA {secrets.token_hex(3)}"),
        ]
    )
    days = min(intermediate_days, max(1, (not_after(root_cert) - now).days))
    int_cert = _ca_builder(
        int_name, root_cert.subject, int_key.public_key(), root_key.public_key(), days, 0, now
    ).sign(root_key, hashes.SHA384())
    write_file(_ca_file(directory, ROOT_KEY_FILE), key_pem(root_key), KEY_MODE)
    write_file(_ca_file(directory, CA_KEY_FILE), key_pem(int_key), KEY_MODE)
    write_file(_ca_file(directory, ROOT_CERT_FILE), cert_pem(root_cert), CERT_MODE)
    write_file(_ca_file(directory, CA_CERT_FILE), cert_pem(int_cert), CERT_MODE)
    write_file(_ca_file(directory, CERT_CHAIN_FILE), cert_pem(int_cert) + cert_pem(root_cert), CERT_MODE)
    return load_ca(directory)


def issue_leaf(
    ca: CaMaterial,
    public_key,
    identity: SpiffeId,
    ttl: int = DEFAULT_CERT_TTL,
    dns_names: Sequence[str] = (),
    ips: Sequence = (),
    now: Optional[datetime.datetime] = None,
) -> x509.Certificate:
    """Sign a workload certificate as istiod would. The lifetime is capped by the signing certificate's."""
    now = now or utcnow()
    ttl = max(1, min(int(ttl), MAX_CERT_TTL))
    expires = min(now + datetime.timedelta(seconds=ttl), not_after(ca.signing_cert))
    if expires <= now:
        raise CaError(f"the signing certificate {describe(ca.signing_cert)} has expired: rotate the CA")
    grace = min(CLOCK_SKEW_GRACE, ttl * 0.1)
    starts = max(now - datetime.timedelta(seconds=grace), not_before(ca.signing_cert))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.signing_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(starts)
        .not_valid_after(expires)
        .add_extension(_san_extension(identity, dns_names, ips), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.signing_cert.public_key()), critical=False
        )
    )
    return builder.sign(ca.signing_key, hashes.SHA256())


def sign_csr(
    ca: CaMaterial,
    csr_pem: str | bytes,
    identity: SpiffeId,
    ttl: int = DEFAULT_CERT_TTL,
    now: Optional[datetime.datetime] = None,
) -> x509.Certificate:
    """Sign a CSR for ``identity`` (already authorized by the caller). A CSR that names a different SPIFFE
    ID is refused rather than silently rewritten, so a misconfigured node is noticed."""
    csr = parse_csr(csr_pem)
    asked = spiffe_uris(csr)
    if asked and asked != [str(identity)]:
        raise IdentityError(
            f"the CSR asks for {', '.join(asked)} but the identity being signed is {identity}"
        )
    return issue_leaf(ca, csr.public_key(), identity, ttl, now=now)


def response_chain(ca: CaMaterial, leaf: x509.Certificate) -> List[str]:
    """One PEM per certificate, leaf first, root last: istiod's IstioCertificateResponse.cert_chain."""
    certs = [leaf] + [c for c in ca.chain if not is_self_signed(c)] + [ca.anchor]
    return [cert_pem(c) for c in certs]


def split_response_chain(pems: Sequence[str]) -> Tuple[x509.Certificate, List[x509.Certificate]]:
    """Leaf and intermediates of a CA response; self-signed roots and duplicates are dropped (the trust
    bundle, not the CA's answer, decides which roots are trusted)."""
    certs: List[x509.Certificate] = []
    for index, pem in enumerate(pems):
        certs.extend(load_certs(pem, f"cert_chain[{index}] of the CA response"))
    if not certs:
        raise IdentityError("the CA returned an empty certificate chain")
    seen = set()
    intermediates = []
    for cert in certs[1:]:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der in seen or is_self_signed(cert):
            continue
        seen.add(der)
        intermediates.append(cert)
    return certs[0], intermediates


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
def write_file(
    path: str, content: str | bytes, mode: int, owner: Optional[int] = None, group: Optional[int] = None
) -> None:
    """Write atomically: temp file in the same directory, fsync, chmod/chown, rename, fsync the directory.
    Readers (the data plane) see the old file or the new one, never a partial one."""
    if isinstance(content, str):
        content = content.encode()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        if owner is not None or group is not None:
            os.fchown(fd, -1 if owner is None else owner, -1 if group is None else group)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def identity_dir(certs_dir: str, identity: SpiffeId) -> str:
    return os.path.join(certs_dir, identity.namespace, identity.service_account)


def read_identity(certs_dir: str, identity: SpiffeId):
    """(key, leaf, intermediates) installed for ``identity``, or None when absent or unreadable."""
    directory = identity_dir(certs_dir, identity)
    try:
        certs = load_cert_file(os.path.join(directory, CHAIN_FILE))
        key = load_key_file(os.path.join(directory, KEY_FILE))
    except IdentityError:
        return None
    return key, certs[0], certs[1:]
