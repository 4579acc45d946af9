"""Inbound plaintext (port 15006): TCP from outside the mesh to a workload on this node.

The connection has no identity, so it is authorized as such (a policy that requires an identity denies
it); a denied connection is closed. Allowed ones are relayed to the target, keeping the client's source
address when ``preserve_source`` is on.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Tuple

from ztproxy.hooks import ConnContext
from ztproxy.listener import reset
from ztproxy.origdst import original_destination
from ztproxy.pump import TcpRelay
from ztproxy.upstream import adopt, connect_upstream

if TYPE_CHECKING:  # pragma: no cover
    from ztproxy.app import App

log = logging.getLogger("ztproxy.inbound")


class PlaintextInboundHandler:
    def __init__(self, app: App) -> None:
        self.app = app

    async def handle(self, sock: socket.socket, peer: Tuple) -> None:
        app = self.app
        try:
            dst_ip, dst_port = original_destination(sock)
        except OSError as exc:
            log.warning("inbound plaintext from %s: cannot read the original destination: %s", peer, exc)
            reset(sock)
            return
        state = app.state
        target = state.local_workload_by_ip(dst_ip, app.settings.node_name)
        if target is None:
            log.info("inbound plaintext %s -> %s:%d: not a workload on this node; refused", peer[0],
                     dst_ip, dst_port)
            reset(sock)
            return
        ctx = ConnContext(
            direction="inbound", reporter="destination", src_ip=peer[0], src_port=peer[1], dst_ip=dst_ip,
            dst_port=dst_port, src_identity=None, dst_identity=target.identity,
            src_workload=state.workload_by_ip(peer[0]), dst_workload=target, dst_service=None,
            protocol="TCP", security_policy="none")
        decision = app.authorizer.authorize(ctx)
        if not decision.allowed:
            log.info("inbound plaintext %s:%d -> %s:%d denied: %s", peer[0], peer[1], dst_ip, dst_port,
                     decision.reason)
            reset(sock)
            return
        relay = TcpRelay(app.observer.opened(ctx))
        try:
            await connect_upstream(app, (dst_ip, dst_port), peer[0], lambda: relay.server)
        except OSError as exc:
            log.info("inbound plaintext %s -> %s:%d: connect failed: %s", peer[0], dst_ip, dst_port, exc)
            relay.tracker.closed(f"connect failed: {exc}")
            reset(sock)
            return
        app.track(relay)
        try:
            await adopt(sock, relay.client)
        except OSError as exc:
            relay.close(f"client connection lost: {exc}", abort=True)
            return
        relay.start()
