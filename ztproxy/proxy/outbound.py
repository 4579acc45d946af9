"""Outbound capture (port 15001): recover the original destination and route the connection.

- destination is a mesh workload speaking HBONE -> HBONE to ``<workload ip>:15008`` (the destination
  node captures it), ``:authority`` = the original ``ip:port``;
- destination is a service VIP -> pick an endpoint (round robin, skipping endpoints whose connect failed
  recently) and tunnel to it as above (or plain TCP for a non-HBONE endpoint);
- anything else -> plain TCP passthrough to the original destination.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ztproxy.hooks import ConnContext, Failure, Reason
from ztproxy.proxy.copy import StreamPump, TcpRelay
from ztproxy.proxy.h2.client import HboneError
from ztproxy.proxy.inputs import ProxyInputs
from ztproxy.proxy.listener import reset
from ztproxy.proxy.origdst import original_destination
from ztproxy.proxy.upstream import adopt, connect_upstream
from ztproxy.state import MeshState, Workload

log = logging.getLogger("ztproxy.outbound")

# How many endpoints of a service one connection tries before giving up.
MAX_ENDPOINT_ATTEMPTS = 3


@dataclass(frozen=True)
class Route:
    """Where one attempt goes: HBONE through ``hbone_addr`` to ``target``, or TCP straight to it."""

    target: Tuple[str, int]
    workload: Optional[Workload]
    hbone_addr: Optional[Tuple[str, int]]


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _same_family_ip(workload: Workload, like: str) -> Optional[str]:
    version = ipaddress.ip_address(like).version
    for ip in workload.workload_ips:
        if ipaddress.ip_address(ip).version == version:
            return ip
    return None


class EndpointPicker:
    """Round robin over a service's endpoints, skipping those that failed within the cooldown."""

    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown
        self._counters: Dict[Tuple[str, int], itertools.count] = {}
        self._failed: Dict[Tuple[str, int], float] = {}

    def order(self, service_key: Tuple[str, int], candidates: List[Tuple[str, int, Workload]]) \
            -> List[Tuple[str, int, Workload]]:
        if not candidates:
            return []
        start = next(self._counters.setdefault(service_key, itertools.count())) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        now = time.monotonic()
        fresh = [c for c in rotated if now - self._failed.get((c[0], c[1]), -1e9) >= self.cooldown]
        # When every endpoint failed recently, still try them: failing fast helps nobody.
        return fresh or rotated

    def failed(self, ip: str, port: int) -> None:
        self._failed[(ip, port)] = time.monotonic()

    def succeeded(self, ip: str, port: int) -> None:
        self._failed.pop((ip, port), None)


class OutboundHandler:
    """Port 15001. ``own_port`` is the port the outbound listener is bound to: a connection addressed
    to it is a capture loop and is refused."""

    def __init__(self, inputs: ProxyInputs, own_port: Optional[int] = None) -> None:
        self.inputs = inputs
        self.own_port = own_port
        self.picker = EndpointPicker(inputs.settings.endpoint_failure_cooldown)

    def routes(self, state: MeshState, dst_ip: str, dst_port: int) -> Tuple[List[Route], Optional[str]]:
        """The attempts for a destination, in order, and the service hostname if it is a VIP."""
        hbone_port = self.inputs.settings.hbone_port
        service = state.service_by_vip(dst_ip)
        if service is not None and dst_port in service.ports:
            candidates = []
            for workload, target_port in state.service_endpoints(service, dst_port):
                ip = _same_family_ip(workload, dst_ip)
                if ip is not None:
                    candidates.append((ip, target_port, workload))
            ordered = self.picker.order((service.namespaced_hostname, dst_port), candidates)
            routes = [Route((ip, port), w, (ip, hbone_port) if w.uses_hbone else None)
                      for ip, port, w in ordered[:MAX_ENDPOINT_ATTEMPTS]]
            return routes, service.hostname
        workload = state.workload_by_ip(dst_ip)
        if workload is not None and workload.uses_hbone:
            return [Route((dst_ip, dst_port), workload, (dst_ip, hbone_port))], None
        return [Route((dst_ip, dst_port), workload, None)], None

    async def handle(self, sock: socket.socket, peer: Tuple) -> None:
        pi = self.inputs
        try:
            dst_ip, dst_port = original_destination(sock)
        except OSError as exc:
            log.warning("outbound from %s: cannot read the original destination: %s", peer, str(exc))
            reset(sock)
            return
        if (dst_ip, dst_port) == tuple(sock.getsockname()[:2]) and dst_port == self.own_port:
            log.warning("outbound from %s: connection addressed to the proxy's own listener %s:%d; "
                        "refused (capture rules missing?)", peer[0], dst_ip, dst_port)
            reset(sock)
            return
        state = pi.state()
        source = state.local_workload_by_ip(peer[0], pi.settings.node_name)
        if source is None:
            log.warning("outbound from %s to %s:%d: the source is not a workload of node %s; refused",
                        peer[0], dst_ip, dst_port, pi.settings.node_name)
            reset(sock)
            return
        routes, service = self.routes(state, dst_ip, dst_port)
        if not routes:
            log.warning("outbound %s -> %s:%d: service %s has no usable endpoint", peer[0], dst_ip,
                        dst_port, service)
            reset(sock)
            return
        error: Optional[str] = "no route"
        for route in routes:
            error, retry = await self._attempt(sock, peer, source, route, service)
            if error is None:
                return
            if service is not None and retry:
                self.picker.failed(*route.target)
            if not retry:
                break
        log.info("outbound %s:%d -> %s:%d failed: %s", peer[0], peer[1], dst_ip, dst_port, error)
        reset(sock)

    def _context(self, peer, source: Workload, route: Route, service: Optional[str]) -> ConnContext:
        hbone = route.hbone_addr is not None
        return ConnContext(
            direction="outbound", reporter="source", src_ip=peer[0], src_port=peer[1],
            dst_ip=route.target[0], dst_port=route.target[1], src_identity=source.identity,
            dst_identity=route.workload.identity if route.workload is not None and hbone else None,
            src_workload=source, dst_workload=route.workload, dst_service=service,
            protocol="HBONE" if hbone else "TCP", security_policy="mutual_tls" if hbone else "none")

    async def _attempt(self, sock: socket.socket, peer, source: Workload, route: Route,
                       service: Optional[str]) -> Tuple[Optional[str], bool]:
        """Connect one route and start pumping: (None, _) on success, else (why, worth another try)."""
        ctx = self._context(peer, source, route, service)
        if route.hbone_addr is None:
            return await self._passthrough(sock, ctx, route)
        pi = self.inputs
        tracker = pi.observer.opened(ctx)
        pump = StreamPump(tracker, tcp_is_client=True)
        try:
            same_family = ipaddress.ip_address(peer[0]).version == \
                ipaddress.ip_address(route.hbone_addr[0]).version
            session = await pi.pool.acquire(source.identity, ctx.dst_identity, route.hbone_addr,
                                             peer[0] if same_family else None)
            status = await session.connect_stream(_host_port(*route.target), self._headers(peer, source),
                                                  pump, pi.settings.connect_timeout)
        except HboneError as exc:
            tracker.closed(Failure(Reason.CONNECT_FAILED, str(exc)))
            return str(exc), True
        if status != 200:
            reason = f"HBONE CONNECT {_host_port(*route.target)} via {_host_port(*route.hbone_addr)} " \
                     f"answered {status}"
            tracker.closed(Failure(Reason.HBONE_REFUSED, reason))
            # 401/400 are the destination's decision: another endpoint would not change it.
            return reason, status == 503
        self.picker.succeeded(*route.target)
        pi.connections.track(pump)
        try:
            transport = await adopt(sock, pump)
        except OSError as exc:  # the client went away meanwhile
            pump.cancel(Failure(Reason.CLIENT_LOST, f"client connection lost: {exc}"))
            return None, False
        pump.attach_tcp(transport)
        pump.start()
        return None, False

    async def _passthrough(self, sock: socket.socket, ctx: ConnContext, route: Route) \
            -> Tuple[Optional[str], bool]:
        pi = self.inputs
        relay = TcpRelay(pi.observer.opened(ctx))
        try:
            await connect_upstream(pi.settings, route.target, ctx.src_ip, lambda: relay.server)
        except OSError as exc:
            relay.tracker.closed(Failure(Reason.CONNECT_FAILED, f"connect failed: {exc}"))
            return f"connect to {_host_port(*route.target)} failed: {exc}", True
        pi.connections.track(relay)
        try:
            await adopt(sock, relay.client)
        except OSError as exc:
            relay.abort(Failure(Reason.CLIENT_LOST, f"client connection lost: {exc}"))
            return None, False
        relay.start()
        return None, False

    @staticmethod
    def _headers(peer, source: Workload) -> List[Tuple[str, str]]:
        # ztunnel's baggage describes the source workload; traceparent starts a new W3C trace.
        kind = source.workload_type or "workload"
        baggage = ",".join(f"{k}={v}" for k, v in (
            ("k8s.cluster.name", source.cluster_id),
            ("k8s.namespace.name", source.namespace),
            (f"k8s.{kind}.name", source.workload_name or source.name),
            ("service.name", source.canonical_name or source.workload_name or source.name),
            ("service.version", source.canonical_revision),
        ) if v)
        return [
            ("forwarded", f'for="{_host_port(peer[0], peer[1])}"'),
            ("baggage", baggage),
            ("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"),
        ]
