"""Inbound plaintext (port 15006): TCP from outside the mesh to a workload on this node.

The connection has no identity, so it is authorized as such (a policy that requires an identity denies
it); a denied connection is closed. Allowed ones are relayed to the target, keeping the client's source
address when ``preserve_source`` is on.

One source address holds at most ``max_plaintext_connections_per_peer`` of them at once, counted from the
accept to the end of the relay: past that, a new connection is reset at accept, before the proxy reads
anything or opens an upstream socket for it.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable, Tuple

from ztproxy.hooks import ConnContext, Failure, Reason
from ztproxy.proxy.copy import TcpRelay
from ztproxy.proxy.inputs import ProxyInputs
from ztproxy.proxy.listener import reset
from ztproxy.proxy.origdst import original_destination
from ztproxy.proxy.upstream import adopt, connect_upstream

log = logging.getLogger("ztproxy.inbound")


class PlaintextInboundHandler:
    def __init__(self, inputs: ProxyInputs) -> None:
        self.inputs = inputs

    async def handle(self, sock: socket.socket, peer: Tuple) -> None:
        pi = self.inputs
        release = pi.connections.plaintext_peers.admit_or_reset(
            sock, peer[0], pi.settings.max_plaintext_connections_per_peer, "plaintext",
            "max_plaintext_connections_per_peer")
        if release is None:
            return
        handed_over = False
        try:
            handed_over = await self._serve(sock, peer, release)
        finally:
            if not handed_over:  # refused, failed or cancelled before a relay took the slot over
                release()

    async def _serve(self, sock: socket.socket, peer: Tuple, release: Callable[[], None]) -> bool:
        """Authorize and relay one connection; True once the relay owns ``release`` (it frees the
        per-peer slot when it ends)."""
        pi = self.inputs
        try:
            dst_ip, dst_port = original_destination(sock)
        except OSError as exc:
            log.warning("inbound plaintext from %s: cannot read the original destination: %s", peer,
                        str(exc))  # a string: a kept record must not pin the connection (h2/session.py)
            reset(sock)
            return False
        state = pi.state()
        target = state.local_workload_by_ip(dst_ip, pi.settings.node_name)
        if target is None:
            log.info("inbound plaintext %s -> %s:%d: not a workload on this node; refused", peer[0],
                     dst_ip, dst_port)
            reset(sock)
            return False
        ctx = ConnContext(
            direction="inbound", reporter="destination", src_ip=peer[0], src_port=peer[1], dst_ip=dst_ip,
            dst_port=dst_port, src_identity=None, dst_identity=target.identity,
            src_workload=state.workload_by_ip(peer[0]), dst_workload=target, dst_service=None,
            protocol="TCP", security_policy="none")
        decision = pi.authorizer.authorize(ctx)
        if not decision.allowed:
            log.info("inbound plaintext %s:%d -> %s:%d denied: %s", peer[0], peer[1], dst_ip, dst_port,
                     decision.reason)
            reset(sock)
            return False
        relay = TcpRelay(pi.observer.opened(ctx), on_done=lambda _failure: release())
        try:
            await connect_upstream(pi.settings, (dst_ip, dst_port), peer[0], lambda: relay.server)
        except OSError as exc:
            log.info("inbound plaintext %s -> %s:%d: connect failed: %s", peer[0], dst_ip, dst_port, str(exc))
            relay.tracker.closed(Failure(Reason.CONNECT_FAILED, f"connect failed: {exc}"))
            reset(sock)
            return False
        pi.connections.track(relay)
        try:
            await adopt(sock, relay.client)
        except OSError as exc:
            relay.abort(Failure(Reason.CLIENT_LOST, f"client connection lost: {exc}"))
            return True
        relay.start()
        return True
