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
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import h2.errors
import h2.events
import h2.exceptions

from ztproxy.certs import CertError, peer_identity_in_domain, tls_problem
from ztproxy.config import parse_host_port
from ztproxy.h2session import H2Limits, H2Session
from ztproxy.hooks import ConnContext
from ztproxy.listener import reset
from ztproxy.origdst import original_destination
from ztproxy.pump import StreamPump
from ztproxy.upstream import connect_upstream

if TYPE_CHECKING:  # pragma: no cover
    from ztproxy.app import App

log = logging.getLogger("ztproxy.inbound")

_FORWARDED_FOR = re.compile(r'for="?([^";,]+)"?', re.IGNORECASE)


_CONNECTION_SPECIFIC = frozenset([b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                  b"upgrade"])


def connect_header_problem(headers) -> Optional[str]:
    """Why a CONNECT header block is malformed (RFC 9113 sections 8.2 and 8.5), or None.

    h2 checks this itself from 4.4 on; on older h2 (Python 3.9 nodes) its inbound validation is off
    because it wrongly demands :path in a CONNECT (see h2session.H2_VALIDATES_CONNECT), so the same
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
    """The client address from ``forwarded: for="ip:port"`` (RFC 7239; IPv6 as "[ip]:port")."""
    match = _FORWARDED_FOR.search(value)
    if not match:
        return None
    try:
        return parse_host_port(match.group(1))
    except ValueError:
        return None


class HboneServerSession(H2Session):
    client_side = False

    def __init__(self, app: App, limits: H2Limits, local_addr: Tuple[str, int]) -> None:
        super().__init__(limits)
        self.app = app
        self.local_addr = local_addr
        self.peer_identity: Optional[str] = None
        self._last_stream_before_goaway: Optional[int] = None

    def check_peer(self, transport: asyncio.BaseTransport) -> Optional[str]:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return "not a TLS connection"
        problem = tls_problem(ssl_object)
        if problem is not None:
            return problem
        self.peer_identity = peer_identity_in_domain(ssl_object, self.app.settings.trust_domain)
        if self.peer_identity is None:
            sans = [v for _, v in (ssl_object.getpeercert() or {}).get("subjectAltName", ())]
            return (f"client certificate has no SPIFFE ID in trust domain {self.app.settings.trust_domain} "
                    f"(subject alternative names: {sans})")
        return None

    def session_started(self) -> None:
        self.app.server_sessions.add(self)

    def session_lost(self, reason: str) -> None:
        self.app.server_sessions.discard(self)

    def goaway(self) -> None:
        self._last_stream_before_goaway = self.conn.highest_inbound_stream_id
        super().goaway()

    # -- requests -------------------------------------------------------------------------------------

    def handle_other_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)

    def _respond(self, stream_id: int, status: int, end: bool) -> None:
        try:
            self.conn.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()

    def _refuse(self, stream_id: int, status: int, why: str) -> None:
        log.info("HBONE request %d from %s (%s) refused with %d: %s", stream_id, self.peername(),
                 self.peer_identity, status, why)
        self._respond(stream_id, status, end=True)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self._last_stream_before_goaway is not None and sid > self._last_stream_before_goaway:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
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
        app = self.app
        state = app.state
        target = state.local_workload_by_ip(target_ip, app.settings.node_name)
        if target is None:
            self._refuse(sid, 400, f"target {authority} is not a workload on node {app.settings.node_name}")
            return
        peer = self.peername() or ("", 0)
        client = parse_forwarded_for(headers.get(b"forwarded", b"").decode("latin-1")) or (peer[0], peer[1])
        src_workload = state.workload_by_ip(client[0])
        ctx = ConnContext(
            direction="inbound", reporter="destination", src_ip=client[0], src_port=client[1],
            dst_ip=target_ip, dst_port=target_port, src_identity=self.peer_identity,
            dst_identity=target.identity, src_workload=src_workload, dst_workload=target, dst_service=None,
            protocol="HBONE", security_policy="mutual_tls")
        decision = app.authorizer.authorize(ctx)
        if not decision.allowed:
            self._refuse(sid, 401, f"authorization denied: {decision.reason}")
            return
        tracker = app.observer.opened(ctx)
        pump = StreamPump(tracker, tcp_is_client=False)
        pump.bind_stream(self, sid)
        app.track(pump)
        if event.stream_ended is not None:
            pump.on_h2_end()
        asyncio.get_event_loop().create_task(self._connect(pump, ctx, client))

    async def _connect(self, pump: StreamPump, ctx: ConnContext, client: Tuple[str, int]) -> None:
        sid = pump.stream_id
        try:
            transport = await connect_upstream(self.app, (ctx.dst_ip, ctx.dst_port), client[0], lambda: pump)
        except OSError as exc:
            log.info("HBONE stream %d: upstream %s:%d connect failed: %s", sid, ctx.dst_ip, ctx.dst_port, exc)
            self.pumps.pop(sid, None)
            self._respond(sid, 503, end=True)
            pump.on_session_lost(f"upstream connect failed: {exc}")
            return
        if pump.finished or self.closed:
            transport.abort()
            return
        pump.attach_tcp(transport)
        self._respond(sid, 200, end=False)
        pump.start()


class HboneListener:
    """Port 15008: picks the certificate of the destination workload, then TLS and HTTP/2."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def handle(self, sock: socket.socket, peer: Tuple) -> None:
        app = self.app
        try:
            dst = original_destination(sock)
        except OSError as exc:
            log.warning("inbound HBONE from %s: cannot read the destination address: %s", peer, exc)
            reset(sock)
            return
        workload = app.state.local_workload_by_ip(dst[0], app.settings.node_name)
        if workload is None:
            log.info("inbound HBONE to %s:%d from %s: no workload with that address on this node",
                     dst[0], dst[1], peer[0])
            reset(sock)
            return
        try:
            contexts = app.certs.get(workload.identity)
        except CertError as exc:
            log.error("inbound HBONE to %s: no usable certificate: %s", workload.identity, exc)
            reset(sock)
            return
        session = HboneServerSession(app, app.h2_limits, dst)
        loop = asyncio.get_event_loop()
        try:
            await loop.connect_accepted_socket(lambda: session, sock, ssl=contexts.server,
                                               ssl_handshake_timeout=app.settings.tls_handshake_timeout)
        except (ssl.SSLError, OSError, ConnectionError, asyncio.TimeoutError) as exc:
            log.info("inbound HBONE TLS handshake with %s failed: %s", peer[0], exc or type(exc).__name__)
            reset(sock)
