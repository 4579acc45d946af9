"""The signing service (`ztproxy ca serve`): Istio's CreateCertificate, authorized by the mesh state.

Stateless apart from the files it reads (CA material, trust bundle, mesh state, deny list, CRLs), all
re-read when they change, so any number of instances can run side by side behind one address list.

Authorization (docs/identity.md, "Who may obtain which identity"):

1. The TLS handshake requires a client certificate that chains to the trust bundle and has not expired
   (OpenSSL); right after it, the certificate is checked against the deny list and CRLs, and a refused
   one gets its connection closed before any request is read.
2. The caller must be a *node identity* ``spiffe://<td>/ns/ztmesh-system/sa/node-<name>`` of this trust
   domain, and ``<name>`` must have workloads in the mesh state (a node removed from the inventory can
   renew nothing from then on).
3. The identity signed is the ``ImpersonatedIdentity`` metadata (as ztunnel sends it) or, without it, the
   caller's own node identity. An impersonated identity must belong to a workload the mesh state places
   on that very node: a stolen node cannot mint the identities of other nodes' workloads. Nothing in
   the reserved namespace ``ztmesh-system`` (node identities, the signing service) is ever signed by
   impersonation, even when a mesh state places a workload there.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from cryptography import x509

from . import grpcwire
from .grpch2 import CallContext, GrpcServer
from .grpcwire import GrpcError
from .meshstate import MeshState
from .pki import (
    DEFAULT_CA_PORT,
    DEFAULT_CERT_TTL,
    DEFAULT_TRUST_DOMAIN,
    MAX_CERT_TTL,
    NODE_NAMESPACE,
    ROOT_CERT_FILE,
    CaMaterial,
    IdentityError,
    SpiffeId,
    ca_service_identity,
    cert_pem,
    certs_pem,
    generate_key,
    identity_of,
    issue_leaf,
    key_pem,
    load_ca,
    load_cert_file,
    not_after,
    not_before,
    response_chain,
    serial_hex,
    sign_csr,
    utcnow,
)
from .revocation import RevocationList

log = logging.getLogger("ztproxy.identity.signer")

SERVER_CERT_TTL = 24 * 3600


@dataclass
class SignerSettings:
    ca_dir: str
    mesh_state: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # Client certificates are verified against this bundle; during a CA roll it holds both roots.
    trust_bundle: Optional[str] = None  # default: <ca_dir>/root-cert.pem
    listen: Sequence[Tuple[str, int]] = (("0.0.0.0", DEFAULT_CA_PORT),)
    default_ttl: int = DEFAULT_CERT_TTL
    max_ttl: int = MAX_CERT_TTL
    deny_list: Optional[str] = None
    crls: Sequence[str] = ()
    # DNS names for the service's own certificate (clients that verify a host name, e.g. grpcio).
    server_names: Sequence[str] = ("ztmesh-ca",)
    handshake_timeout: float = 10.0

    @property
    def trust_bundle_path(self) -> str:
        return self.trust_bundle or os.path.join(self.ca_dir, ROOT_CERT_FILE)


def _files_signature(paths: Sequence[str]) -> Tuple:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((path, None))
    return tuple(out)


@dataclass
class _TlsState:
    context: ssl.SSLContext
    renew_at: datetime.datetime
    signature: Tuple


@dataclass
class SigningService:
    settings: SignerSettings
    _ca: Optional[CaMaterial] = None
    _ca_signature: Tuple = ()
    _tls: Optional[_TlsState] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.mesh_state = MeshState(self.settings.mesh_state, self.settings.trust_domain)
        self.revocations = RevocationList(
            self.settings.deny_list,
            tuple(self.settings.crls),
            (
                self.settings.trust_bundle_path,
                os.path.join(self.settings.ca_dir, "cert-chain.pem"),
                os.path.join(self.settings.ca_dir, "ca-cert.pem"),
            ),
        )
        self.ca()  # fail at start, with the CA's own message, rather than at the first request
        load_cert_file(self.settings.trust_bundle_path)

    # -- CA material, reloaded when its files change (CA roll: the files or a symlink are swapped) --
    def _ca_files(self) -> List[str]:
        return [
            os.path.join(self.settings.ca_dir, name)
            for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
        ]

    def ca(self) -> CaMaterial:
        signature = _files_signature(self._ca_files())
        if self._ca is None or signature != self._ca_signature:
            try:
                ca = load_ca(self.settings.ca_dir)
            except IdentityError:
                if self._ca is None:
                    raise
                log.exception(
                    "keeping the previous CA: the new CA material in %s is not usable", self.settings.ca_dir
                )
                self._ca_signature = signature
                return self._ca
            if self._ca is not None:
                log.info("CA material changed: now signing with %s", ca.signing_cert.subject.rfc4514_string())
            self._ca, self._ca_signature = ca, signature
        return self._ca

    # -- authorization --
    def authorize(self, caller: Optional[SpiffeId], impersonate: Optional[str]) -> SpiffeId:
        """The identity to sign for this caller, or GrpcError (UNAUTHENTICATED / PERMISSION_DENIED)."""
        if caller is None:
            raise GrpcError(grpcwire.UNAUTHENTICATED, "the client certificate has no SPIFFE ID")
        if caller.trust_domain != self.settings.trust_domain:
            raise GrpcError(
                grpcwire.UNAUTHENTICATED, f"{caller} is not in trust domain {self.settings.trust_domain}"
            )
        if not caller.is_node:
            raise GrpcError(
                grpcwire.PERMISSION_DENIED,
                f"{caller} is not a node identity (only node identities "
                "spiffe://<td>/ns/ztmesh-system/sa/node-<name> may request certificates)",
            )
        node = caller.node_name or ""
        if not self.mesh_state.has_node(node):
            raise GrpcError(grpcwire.PERMISSION_DENIED, f"node {node} is not in the mesh state")
        if not impersonate or impersonate == str(caller):
            return caller
        try:
            wanted = SpiffeId.parse(impersonate)
        except IdentityError as exc:
            raise GrpcError(grpcwire.INVALID_ARGUMENT, f"ImpersonatedIdentity: {exc}") from exc
        if wanted.namespace == NODE_NAMESPACE:
            # ztmesh-system holds the node identities and the signing service's own: a node may renew
            # its own node identity (above) and nothing else there, whatever the mesh state says. A
            # workload placed in this namespace (hand-written or older mesh state) would otherwise let
            # its node mint another node's identity, and with it that node's workload identities.
            raise GrpcError(
                grpcwire.PERMISSION_DENIED,
                f"{wanted} is in the reserved namespace {NODE_NAMESPACE} (node identities and the "
                f"signing service): no node may obtain it, only node-{node} its own node identity",
            )
        if wanted not in self.mesh_state.identities_on(node):
            raise GrpcError(
                grpcwire.PERMISSION_DENIED,
                f"node {node} runs no workload with identity {wanted} in the mesh state",
            )
        return wanted

    def admit(self, peer_der: Optional[bytes], peer: Tuple[str, int]) -> bool:
        if peer_der is None:
            return False
        reason = self.revocations.check(peer_der)
        if reason:
            log.warning("refused %s at the handshake: %s", peer, reason)
            return False
        return True

    async def create_certificate(self, payload: bytes, context: CallContext) -> bytes:
        csr, validity, metadata = grpcwire.parse_request(payload)
        caller_cert = x509.load_der_x509_certificate(context.peer_cert_der) if context.peer_cert_der else None
        caller = identity_of(caller_cert) if caller_cert is not None else None
        identity = self.authorize(caller, metadata.get(grpcwire.IMPERSONATED_IDENTITY))
        ttl = self.settings.default_ttl if validity <= 0 else min(validity, self.settings.max_ttl)
        ca = self.ca()
        try:
            leaf = sign_csr(ca, csr, identity, ttl)
        except IdentityError as exc:
            raise GrpcError(grpcwire.INVALID_ARGUMENT, str(exc)) from exc
        log.info(
            "issued %s serial=%s not_after=%s to node %s (%s)",
            identity,
            serial_hex(leaf),
            not_after(leaf).isoformat(),
            caller.node_name if caller else "?",
            context.peer_address[0],
        )
        return grpcwire.make_response(response_chain(ca, leaf))

    # -- TLS: the service's own certificate is issued by its CA, in memory, and renewed at half-life --
    def _build_tls(self) -> _TlsState:
        ca = self.ca()
        key = generate_key()
        ips = []
        for host, _port in self.settings.listen:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                continue
            if not address.is_unspecified:
                ips.append(address)
        leaf = issue_leaf(
            ca,
            key.public_key(),
            ca_service_identity(self.settings.trust_domain),
            SERVER_CERT_TTL,
            dns_names=list(self.settings.server_names),
            ips=ips,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["h2"])
        context.load_verify_locations(cadata=certs_pem(load_cert_file(self.settings.trust_bundle_path)))
        # load_cert_chain() only reads files: a private 0700 directory holds them for the instant it takes.
        with tempfile.TemporaryDirectory(prefix="ztmesh-ca-") as tmp:
            chain_path, key_path = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
            with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(key_pem(key))
            with open(chain_path, "w") as handle:
                handle.write(cert_pem(leaf) + "".join(cert_pem(c) for c in ca.chain))
            context.load_cert_chain(chain_path, key_path)
        lifetime = not_after(leaf) - not_before(leaf)
        return _TlsState(context=context, renew_at=utcnow() + lifetime / 2, signature=self._tls_signature())

    def _tls_signature(self) -> Tuple:
        return (self._ca_signature, _files_signature([self.settings.trust_bundle_path]))

    def current_tls(self) -> ssl.SSLContext:
        with self._lock:
            self.ca()
            state = self._tls
            if state is None or utcnow() >= state.renew_at or state.signature != self._tls_signature():
                self._tls = state = self._build_tls()
            return state.context

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: every handshake switches to the current one (SNI callback, called with
        or without SNI), so a new CA, trust bundle or server certificate applies to new connections
        without a restart and without touching established ones."""
        outer = self.current_tls()

        def switch(ssl_object, _server_name, _context) -> None:
            try:
                ssl_object.context = self.current_tls()
            except Exception:  # a broken reload must not kill the listener; the old context stays
                log.exception("cannot refresh the TLS context; using the previous one")

        outer.sni_callback = switch
        return outer


class SignerServer:
    """One signing-service instance: ``await start()`` returns the bound addresses, ``await close()``."""

    def __init__(self, settings: SignerSettings) -> None:
        self.settings = settings
        self.service = SigningService(settings)
        self._server = GrpcServer(
            grpcwire.PATH,
            self.service.create_certificate,
            self.service.server_context(),
            admission=self.service.admit,
            handshake_timeout=settings.handshake_timeout,
        )
        self.addresses: List[Tuple[str, int]] = []

    async def start(self) -> List[Tuple[str, int]]:
        for host, port in self.settings.listen:
            self.addresses.append(await self._server.listen(host, port))
            log.info(
                "signing service listening on %s:%d (trust domain %s, CA %s)",
                self.addresses[-1][0],
                self.addresses[-1][1],
                self.settings.trust_domain,
                self.settings.ca_dir,
            )
        return self.addresses

    async def close(self) -> None:
        await self._server.close()


async def serve(settings: SignerSettings, stop: Optional[asyncio.Event] = None) -> None:
    """Run the signing service until ``stop`` is set (forever when None)."""
    server = SignerServer(settings)
    await server.start()
    try:
        await (stop.wait() if stop is not None else asyncio.Future())
    finally:
        await server.close()
