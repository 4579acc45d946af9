"""The proxy (the data plane): listeners, mesh state and certificate reload, graceful drain.

``Proxy`` loads the mesh state and the certificates, binds the three listeners, builds one frozen
``ProxyInputs`` (ztproxy.proxy.inputs) and hands it to the connection handlers: outbound (15001),
inbound HBONE (15008), inbound plaintext (15006). The handlers never see the proxy.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

from ztproxy.certs import CertError, CertStore, IdentityFiles, load_trust_bundle
from ztproxy.config import Settings
from ztproxy.hooks import AllowAll, Authorizer, ConnectionObserver, Failure, NoObserver, Reason
from ztproxy.proxy.connection_manager import ConnectionManager
from ztproxy.proxy.h2.session import H2Limits
from ztproxy.proxy.inbound import HboneListener
from ztproxy.proxy.inbound_passthrough import PlaintextInboundHandler
from ztproxy.proxy.inputs import ProxyInputs
from ztproxy.proxy.listener import Handler, Listener
from ztproxy.proxy.origdst import SO_MARK, listening_socket
from ztproxy.proxy.outbound import OutboundHandler
from ztproxy.proxy.pool import HbonePool
from ztproxy.state import MeshState, MeshStateError, MeshStateWatcher

log = logging.getLogger("ztproxy")


class StartupError(Exception):
    """ztproxy cannot start; the message says what to fix."""


def _listen_hint(exc: OSError, transparent: bool) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "another process is listening on that address; stop it or change the 'listen' setting"
    if exc.errno in (errno.EPERM, errno.EACCES) and transparent:
        return ("IP_TRANSPARENT needs CAP_NET_ADMIN: run ztproxy with that capability, or set "
                "'listen.transparent: false' when only REDIRECT capture is used")
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not configured on this host (or namespace)"
    return "check the 'listen' setting"


def _check_socket_mark(mark: int) -> None:
    """Fail at start, not on every connection, when the proxy may not mark its sockets."""
    if not mark:
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise StartupError(f"cannot set socket_mark {mark:#x} on sockets ({exc.strerror}): ztproxy needs "
                           "CAP_NET_ADMIN for it, or set 'socket_mark: 0' when the node's rules do not "
                           "rely on the mark") from None
    finally:
        probe.close()


def load_revocation(settings: Settings, state: MeshState) -> Callable[[bytes], Optional[str]]:
    """The revocation check of the ``revocation`` settings (deny list and CRLs, re-read when they change).

    A CRL is trusted only when a CA certificate it names verifies its signature: the roots of the trust
    bundle, and the intermediates in the certificate chains of this node's identities (workload
    certificates are signed by an intermediate, so their CRLs are too). A file that cannot be used stops
    the start."""
    from ztproxy.identity.pki import IdentityError, node_identity
    from ztproxy.identity.revocation import RevocationList

    node = node_identity(settings.trust_domain, settings.node_name)
    chains = [IdentityFiles.under(settings.certs_dir, node.namespace, node.service_account).cert_chain]
    chains += [IdentityFiles.under(settings.certs_dir, w.namespace, w.service_account).cert_chain
               for w in state.local_workloads(settings.node_name)]
    issuers = [settings.trust_bundle] + sorted({path for path in chains if os.path.exists(path)})
    config = settings.revocation
    try:
        revocation = RevocationList(deny_list_path=config.deny_list, crl_paths=list(config.crls),
                                    crl_issuer_paths=issuers)
    except IdentityError as exc:
        raise StartupError(f"revocation: {exc}; fix the file or the 'revocation' settings") from None
    return revocation.check


class Proxy:
    """One ztproxy data plane. Built with the authorizer and observer the handlers call (ztproxy.hooks);
    ``ztproxy.app.App`` builds it with authorization and telemetry for ``ztproxy run``."""

    def __init__(self, settings: Settings, authorizer: Optional[Authorizer] = None,
                 observer: Optional[ConnectionObserver] = None) -> None:
        self.settings = settings
        self.authorizer: Authorizer = authorizer if authorizer is not None else AllowAll()
        self.observer: ConnectionObserver = observer if observer is not None else NoObserver()
        self.limits = H2Limits.from_settings(settings)
        self.connections = ConnectionManager()
        self.certs = CertStore(settings.certs_dir, settings.trust_bundle)
        self.pool = HbonePool(settings, self.certs, self.limits, self.connections.spawn)
        self.state_watcher: Optional[MeshStateWatcher] = None
        self.inputs: Optional[ProxyInputs] = None
        self.bound: Dict[str, Tuple[str, int]] = {}
        self.draining = False
        self._servers: Dict[str, Listener] = {}
        self._reload_task: Optional[asyncio.Task] = None

    @property
    def state(self) -> MeshState:
        assert self.state_watcher is not None, "Proxy.start() loads the mesh state"
        return self.state_watcher.current

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        try:
            self.state_watcher = MeshStateWatcher(settings.mesh_state, settings.trust_domain)
        except MeshStateError as exc:
            raise StartupError(str(exc)) from None
        try:
            load_trust_bundle(settings.trust_bundle)
        except CertError as exc:
            raise StartupError(str(exc)) from None
        _check_socket_mark(settings.socket_mark)
        if settings.revocation.enabled:
            self.certs.revocation = load_revocation(settings, self.state)
        local = self.state.local_workloads(settings.node_name)
        if not local:
            log.warning("the mesh state has no workload on node %r: nothing to proxy until it does",
                        settings.node_name)
        for identity in sorted({w.identity for w in local}):
            try:
                self.certs.get(identity)
            except CertError as exc:
                log.error("workload identity %s has no usable certificate yet: %s", identity, exc)
        sockets = self._bind()
        watcher = self.state_watcher
        self.inputs = inputs = ProxyInputs(
            settings=settings, state=lambda: watcher.current, certs=self.certs, pool=self.pool,
            authorizer=self.authorizer, observer=self.observer, limits=self.limits,
            connections=self.connections)
        outbound_port = self.bound["outbound"][1] if "outbound" in self.bound else None
        handlers: Dict[str, Handler] = {
            "outbound": OutboundHandler(inputs, outbound_port).handle,
            "inbound": HboneListener(inputs).handle,
            "inbound_plaintext": PlaintextInboundHandler(inputs).handle,
        }
        for name, sock in sockets:
            self._servers[name] = Listener(name, sock, handlers[name], self.connections.spawn)
        for server in self._servers.values():
            server.start()
        self._reload_task = asyncio.get_event_loop().create_task(self._reload_loop())
        log.info("ztproxy ready on node %s: %s", settings.node_name,
                 ", ".join(f"{n} {a[0]}:{a[1]}" for n, a in self.bound.items()))

    def _bind(self) -> List[Tuple[str, socket.socket]]:
        """The listening sockets of the configured listeners; none stays open when one fails."""
        settings = self.settings
        sockets: List[Tuple[str, socket.socket]] = []
        listeners = (("outbound", settings.listen.outbound), ("inbound", settings.listen.inbound),
                     ("inbound_plaintext", settings.listen.inbound_plaintext))
        for name, address in listeners:
            if address is None:
                continue
            try:
                sock = listening_socket(address, settings.listen.transparent)
            except OSError as exc:
                for _, opened in sockets:
                    opened.close()
                self.bound.clear()
                raise StartupError(f"cannot listen on {address[0]}:{address[1]} (listen.{name}): "
                                   f"{exc.strerror}; {_listen_hint(exc, settings.listen.transparent)}"
                                   ) from None
            self.bound[name] = sock.getsockname()[:2]
            sockets.append((name, sock))
        return sockets

    async def _reload_loop(self) -> None:
        assert self.state_watcher is not None
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                self.state_watcher.poll()
                self.certs.refresh()
            except Exception:  # never let a reload bug stop reloading
                log.exception("reload failed")

    async def drain(self, timeout: Optional[float] = None) -> bool:
        """Stop accepting, GOAWAY, let connections finish until the deadline, then close the rest.

        Returns True when every connection finished on its own."""
        timeout = self.settings.drain_timeout if timeout is None else timeout
        self.draining = True
        connections = self.connections
        for server in self._servers.values():
            server.close()
        for session in list(connections.server_sessions) + list(self.pool.sessions()):
            session.goaway()
        log.info("draining: %d connection(s) open, deadline %.1fs", len(connections.active), timeout)
        deadline = time.monotonic() + timeout
        while connections.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        remaining = len(connections.active)
        if remaining:
            log.warning("drain deadline reached: closing %d connection(s) still open", remaining)
        for connection in connections.active:
            connection.abort(Failure(Reason.SHUTDOWN, "proxy shutting down"))
        for session in list(connections.server_sessions) + list(self.pool.sessions()):
            session.close()
        if self._reload_task is not None:
            self._reload_task.cancel()
        connections.cancel_tasks()
        await asyncio.sleep(0)
        return remaining == 0
