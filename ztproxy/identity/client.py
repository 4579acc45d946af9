"""Client of Istio's certificate API: ztmesh's signing service, or a real istiod.

Each call opens a fresh mTLS connection, authenticated with the node certificate as it is on disk at
that moment (so a renewed node certificate is used from the next call on), and tries the CA addresses
in random order until one answers: several signer instances share the load and cover for each other.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from cryptography import x509

from . import grpch2, grpcwire
from .grpcwire import GrpcError
from .pki import DEFAULT_CA_PORT, IdentityError, identity_of


def parse_address(text: str, what: str = "CA address", allow_port_zero: bool = False) -> Tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (port 15012). Port 0 (any free port) only for listeners."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else str(DEFAULT_CA_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(DEFAULT_CA_PORT)
    lowest = 0 if allow_port_zero else 1
    if not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise IdentityError(f"{what} {text!r} is not host:port (for example 10.0.0.5:{DEFAULT_CA_PORT})")
    return host, int(port)


@dataclass
class CaClient:
    addresses: Sequence[Tuple[str, int]]
    trust_bundle: str  # PEM file of the roots that may have issued the CA's server certificate
    client_chain: str  # cert-chain.pem of the node identity
    client_key: str
    # How the CA server is recognised: its SPIFFE ID (ztmesh's signer, default) or, when set, a DNS name
    # checked the usual way (istiod: istiod.istio-system.svc).
    ca_identity: Optional[str] = None
    server_hostname: Optional[str] = None
    token_path: Optional[str] = None  # bearer token file, sent as `authorization` (istiod's JWT auth)
    timeout: float = 10.0

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        context.load_verify_locations(cafile=self.trust_bundle)
        context.load_cert_chain(self.client_chain, self.client_key)
        context.check_hostname = bool(self.server_hostname)
        return context

    def _verify_server(self, der: bytes) -> None:
        if self.server_hostname or not self.ca_identity:
            return
        found = identity_of(x509.load_der_x509_certificate(der))
        if str(found) != self.ca_identity:
            raise GrpcError(
                grpcwire.UNAUTHENTICATED, f"the CA server presented {found}, expected {self.ca_identity}"
            )

    def _metadata(self) -> List[Tuple[str, str]]:
        if not self.token_path:
            return []
        with open(self.token_path, encoding="utf-8") as handle:
            return [("authorization", "Bearer " + handle.read().strip())]

    async def create_certificate(
        self, csr_pem: str, validity_seconds: int, impersonate: Optional[str] = None
    ) -> List[str]:
        """The PEM chain (leaf first) for ``csr_pem``; raises the last error when every address failed."""
        payload = grpcwire.make_request(csr_pem, validity_seconds, impersonate)
        context = self._context()
        errors = []
        for host, port in random.sample(list(self.addresses), len(self.addresses)):
            try:
                answer = await grpch2.unary_call(
                    host,
                    port,
                    context,
                    grpcwire.PATH,
                    payload,
                    server_hostname=self.server_hostname,
                    metadata=self._metadata(),
                    timeout=self.timeout,
                    verify_peer=self._verify_server,
                )
                return grpcwire.parse_response(answer)
            except GrpcError as exc:
                errors.append(f"{host}:{port}: {exc.message} (gRPC status {exc.code})")
                if exc.code in (grpcwire.PERMISSION_DENIED, grpcwire.INVALID_ARGUMENT):
                    break  # every instance reads the same mesh state: asking the others changes nothing
            except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError) as exc:
                hint = ""
                if isinstance(exc, (ConnectionResetError, ssl.SSLError)):
                    hint = (
                        " (the CA may have refused this node's certificate: expired, revoked or not from its "
                        "trust bundle; see its log)"
                    )
                errors.append(f"{host}:{port}: {type(exc).__name__}: {exc}{hint}")
        raise CaUnavailable("; ".join(errors) or "no CA address configured")


class CaUnavailable(Exception):
    """No CA address gave a certificate; the message has each address's reason."""
