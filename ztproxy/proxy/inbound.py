"""Inbound HBONE (port 15008): mutual TLS, HTTP/2 CONNECT, authorize, connect to the local target.

Responses as ztunnel: 200 once the upstream socket is connected, 400 for a malformed request or a
target that is not a workload on this node, 401 when authorization denies, 503 when the upstream
connect fails.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from typing import Callable, Dict, Optional, Tuple

import h2.events

from ztproxy.certs import CertError, peer_identity_in_domain, peer_spiffe_ids, tls_problem
from ztproxy.config import parse_host_port
from ztproxy.hooks import ConnContext, Failure, Reason
from ztproxy.proxy.copy import StreamPump, abort_with_reset
from ztproxy.proxy.h2.server import H2ServerSession
from ztproxy.proxy.inputs import ProxyInputs
from ztproxy.proxy.listener import reset
from ztproxy.proxy.origdst import original_destination
from ztproxy.proxy.upstream import connect_upstream

log = logging.getLogger("ztproxy.inbound")

_FORWARDED_FOR = re.compile(r'for="?([^";,]+)"?', re.IGNORECASE)


_CONNECTION_SPECIFIC = frozenset([b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                  b"upgrade"])


def connect_header_problem(headers) -> Optional[str]:
    """Why a CONNECT header block is malformed (RFC 9113 sections 8.2 and 8.5), or None.

    h2 checks this itself from 4.4 on; on older h2 (Python 3.9 nodes) its inbound validation is off
    because it wrongly demands :path in a CONNECT (see h2.session.H2_VALIDATES_CONNECT), so the same
    rules are enforced here, on every version.
    """
    seen_pseudo = set()
    regular_started = False
    for raw_name, _value in headers:
        name = bytes(raw_name)
        if name.startswith(b":"):
            if regular_started:
                return f"pseudo-header {name!r} after a regular header"
            if name in seen_pseudo:
                return f"pseudo-header {name!r} repeated"
            if name not in (b":method", b":authority"):
                return f"pseudo-header {name!r} is not allowed in a CONNECT request"
            seen_pseudo.add(name)
            continue
        regular_started = True
        if name != name.lower():
            return f"header name {name!r} is not lowercase"
        if name in _CONNECTION_SPECIFIC:
            return f"connection-specific header {name!r}"
    return None


def parse_forwarded_for(value: str) -> Optional[Tuple[str, int]]:
    """The client address from ``forwarded: for="ip:port"`` (RFC 7239; IPv6 as "[ip]:port").

    Never used for a decision or an address (see HboneServerSession.handle_request), only, when consistent
    with the peer's certificate, for telemetry labels (source_workload)."""
    match = _FORWARDED_FOR.search(value)
    if not match:
        return None
    try:
        return parse_host_port(match.group(1))
    except ValueError:
        return None


def source_workload(state, peer_ip: str, peer_identity: Optional[str], forwarded: Optional[str]):
    """The workload whose labels telemetry gives a connection's source: the workload at the connection's
    source address when it holds the peer's verified identity; else (a source node that does not
    preserve addresses) the workload the ``forwarded`` header names, only if it holds that identity
    too, so the labels never claim a workload the certificate does not prove (ztunnel labels such
    sources from the peer's baggage). Never used for a decision; else None."""
    for ip in (peer_ip, forwarded):
        candidate = state.workload_by_ip(ip) if ip else None
        if candidate is not None and candidate.identity == peer_identity:
            return candidate
    return None


class HboneServerSession(H2ServerSession):
    """An inbound HBONE connection: the peer's certificate checked, each CONNECT authorized and
    connected to its local target."""

    def __init__(self, inputs: ProxyInputs, local_addr: Tuple[str, int]) -> None:
        settings = inputs.settings
        super().__init__(inputs.limits, settings.preface_timeout, settings.idle_timeout)
        self.inputs = inputs
        self.local_addr = local_addr
        self.peer_identity: Optional[str] = None
        self.on_closed: Optional[Callable[[], None]] = None  # frees the per-peer connection slot

    def check_peer(self, transport: asyncio.BaseTransport) -> Optional[str]:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return "not a TLS connection"
        problem = tls_problem(ssl_object)
        if problem is not None:
            return problem
        uris = peer_spiffe_ids(ssl_object)
        if len(uris) != 1:
            # Exactly one identity, as the signer issues them: with several, which one a policy or a
            # log sees would be the proxy's choice, not the CA's.
            return f"client certificate has {len(uris)} URI SANs ({', '.join(uris)}); exactly one is accepted"
        trust_domain = self.inputs.settings.trust_domain
        self.peer_identity = peer_identity_in_domain(ssl_object, trust_domain)
        if self.peer_identity is None:
            sans = [v for _, v in (ssl_object.getpeercert() or {}).get("subjectAltName", ())]
            return (f"client certificate has no SPIFFE ID in trust domain {trust_domain} "
                    f"(subject alternative names: {sans})")
        return None

    def session_started(self) -> None:
        self.inputs.connections.server_sessions.add(self)
        super().session_started()

    def session_lost(self, reason: str) -> None:
        self.inputs.connections.server_sessions.discard(self)
        super().session_lost(reason)
        if self.on_closed is not None:
            self.on_closed()
            self.on_closed = None

    # -- requests -------------------------------------------------------------------------------------

    def _refuse(self, stream_id: int, status: int, why: str) -> None:
        log.info("HBONE request %d from %s (%s) refused with %d: %s", stream_id, self.peername(),
                 self.peer_identity, status, why)
        self.respond(stream_id, status, end=True)

    def handle_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        problem = connect_header_problem(event.headers)
        if problem:
            self._refuse(sid, 400, problem)
            return
        headers: Dict[bytes, bytes] = {}
        for name, value in event.headers:
            headers.setdefault(bytes(name), bytes(value))
        if headers.get(b":method") != b"CONNECT":
            self._refuse(sid, 400, f"method {headers.get(b':method')!r} (only CONNECT is served)")
            return
        authority = headers.get(b":authority", b"").decode("latin-1")
        try:
            target_ip, target_port = parse_host_port(authority)
        except ValueError:
            self._refuse(sid, 400, f":authority {authority!r} is not IP:PORT")
            return
        pi = self.inputs
        node = pi.settings.node_name
        state = pi.state()
        target = state.local_workload_by_ip(target_ip, node)
        if target is None:
            self._refuse(sid, 400, f"target {authority} is not a workload on node {node}")
            return
        served = state.local_workload_by_ip(self.local_addr[0], node)
        if served is None or served.uid != target.uid:
            # The TLS connection was addressed to (and authenticated as) another workload; as ztunnel,
            # a CONNECT may only reach the workload whose certificate served it.
            self._refuse(sid, 400, f"target {authority} is not the workload this connection was addressed "
                                   f"to ({self.local_addr[0]})")
            return
        # The client is the connection's own source address. The peer's `forwarded` header is never
        # trusted: any workload with a valid certificate could name another's address in it and pass a
        # sourceIps policy as that workload (issue 13). ztunnel trusts it only from its own waypoint,
        # which ztproxy does not have. Source nodes preserve addresses by connecting from them.
        peer = self.peername() or ("", 0)
        client = (peer[0], peer[1])
        named = parse_forwarded_for(headers.get(b"forwarded", b"").decode("latin-1"))
        src_workload = source_workload(state, client[0], self.peer_identity, named[0] if named else None)
        ctx = ConnContext(
            direction="inbound", reporter="destination", src_ip=client[0], src_port=client[1],
            dst_ip=target_ip, dst_port=target_port, src_identity=self.peer_identity,
            dst_identity=target.identity, src_workload=src_workload, dst_workload=target, dst_service=None,
            protocol="HBONE", security_policy="mutual_tls")
        decision = pi.authorizer.authorize(ctx)
        if not decision.allowed:
            self._refuse(sid, 401, f"authorization denied: {decision.reason}")
            return
        tracker = pi.observer.opened(ctx)
        pump = StreamPump(tracker, tcp_is_client=False)
        pump.bind_stream(self, sid)
        pi.connections.track(pump)
        if event.stream_ended is not None:
            pump.on_h2_end()
        # Kept on the pump so that a reset of the stream cancels the connect (pump._finish).
        pump.connect_task = asyncio.get_event_loop().create_task(self._connect(pump, ctx, client))

    async def _connect(self, pump: StreamPump, ctx: ConnContext, client: Tuple[str, int]) -> None:
        sid = pump.stream_id
        try:
            transport = await connect_upstream(self.inputs.settings, (ctx.dst_ip, ctx.dst_port), client[0],
                                               lambda: pump)
        except asyncio.CancelledError:
            return  # the stream was reset meanwhile; connect_upstream closed its socket
        except OSError as exc:
            log.info("HBONE stream %d: upstream %s:%d connect failed: %s", sid, ctx.dst_ip, ctx.dst_port,
                     str(exc))  # a string: a kept record must not pin the connection (h2/session.py)
            self.pumps.pop(sid, None)
            self.respond(sid, 503, end=True)
            pump.abort(Failure(Reason.CONNECT_FAILED, f"upstream connect failed: {exc}"))
            return
        pump.connect_task = None
        if pump.finished or self.closed:
            abort_with_reset(transport)
            return
        pump.attach_tcp(transport)
        self.respond(sid, 200, end=False)
        pump.start()


class HboneListener:
    """Port 15008: picks the certificate of the destination workload, then TLS and HTTP/2."""

    def __init__(self, inputs: ProxyInputs) -> None:
        self.inputs = inputs

    async def handle(self, sock: socket.socket, peer: Tuple) -> None:
        pi = self.inputs
        try:
            dst = original_destination(sock)
        except OSError as exc:
            log.warning("inbound HBONE from %s: cannot read the destination address: %s", peer, str(exc))
            reset(sock)
            return
        workload = pi.state().local_workload_by_ip(dst[0], pi.settings.node_name)
        if workload is None:
            log.info("inbound HBONE to %s:%d from %s: no workload with that address on this node",
                     dst[0], dst[1], peer[0])
            reset(sock)
            return
        try:
            contexts = pi.certs.get(workload.identity)
        except CertError as exc:
            log.error("inbound HBONE to %s: no usable certificate: %s", workload.identity, exc)
            reset(sock)
            return
        # The per-peer cap counts from the accept, handshakes included: a peer cannot hold more than
        # max_connections_per_peer TLS sessions (and their buffers) at once, whatever state they are in.
        release = pi.connections.hbone_peers.admit_or_reset(
            sock, peer[0], pi.settings.max_connections_per_peer, "HBONE", "max_connections_per_peer")
        if release is None:
            return
        session = HboneServerSession(pi, dst)
        session.on_closed = release
        loop = asyncio.get_event_loop()
        try:
            await loop.connect_accepted_socket(lambda: session, sock, ssl=contexts.server,
                                               ssl_handshake_timeout=pi.settings.tls_handshake_timeout)
        except (ssl.SSLError, OSError, ConnectionError, asyncio.TimeoutError) as exc:
            log.info("inbound HBONE TLS handshake with %s failed: %s", peer[0],
                     str(exc) or type(exc).__name__)
            release()
            reset(sock)
        except BaseException:
            release()
            raise
        else:
            if session.transport is None:  # no connection_made: nothing will call session_lost
                release()
