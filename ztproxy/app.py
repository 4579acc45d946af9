"""Wiring: listeners, mesh state and certificate reload, connection tracking, graceful drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from typing import Any, Callable, Dict, Optional, Set, Tuple

from ztproxy.certs import CertError, CertStore, IdentityFiles, load_trust_bundle
from ztproxy.config import Settings
from ztproxy.h2session import H2Limits, H2Session
from ztproxy.hbone_server import HboneListener
from ztproxy.hooks import AllowAll, Authorizer, ConnectionObserver, NoObserver
from ztproxy.inbound import PlaintextInboundHandler
from ztproxy.listener import Listener
from ztproxy.origdst import SO_MARK, listening_socket
from ztproxy.outbound import OutboundHandler
from ztproxy.pool import HbonePool
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


class App:
    """One ztproxy instance. Built with the authorizer and observer the data plane calls (hooks.py)."""

    def __init__(self, settings: Settings, authorizer: Optional[Authorizer] = None,
                 observer: Optional[ConnectionObserver] = None) -> None:
        self.settings = settings
        self.authorizer: Authorizer = authorizer if authorizer is not None else AllowAll()
        self.observer: ConnectionObserver = observer if observer is not None else NoObserver()
        self.h2_limits = H2Limits.from_settings(settings)
        # Inbound HBONE connections per peer address, TLS handshakes included (max_connections_per_peer).
        self.peer_connections: Dict[str, int] = {}
        self.certs = CertStore(settings.certs_dir, settings.trust_bundle)
        self.pool = HbonePool(self)
        self.state_watcher: Optional[MeshStateWatcher] = None
        self.server_sessions: Set[H2Session] = set()
        self.bound: Dict[str, Tuple[str, int]] = {}
        self.draining = False
        self._servers: Dict[str, Listener] = {}
        self._active: Set[Any] = set()
        self._tasks: Set[asyncio.Task] = set()
        self._reload_task: Optional[asyncio.Task] = None

    # -- state ----------------------------------------------------------------------------------------

    @property
    def state(self) -> MeshState:
        assert self.state_watcher is not None, "App.start() loads the mesh state"
        return self.state_watcher.current

    def bound_port(self, name: str) -> Optional[int]:
        address = self.bound.get(name)
        return address[1] if address else None

    @property
    def active_connections(self) -> int:
        return len(self._active)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in a connection handler", exc_info=task.exception())

    def track(self, connection: Any) -> None:
        """Count a proxied connection (pump or relay) as active until it finishes (for drain)."""
        self._active.add(connection)
        previous = connection.on_done

        def done(error: Optional[str]) -> None:
            self._active.discard(connection)
            if previous is not None:
                previous(error)

        connection.on_done = done

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
        listeners = (
            ("outbound", settings.listen.outbound, OutboundHandler(self).handle),
            ("inbound", settings.listen.inbound, HboneListener(self).handle),
            ("inbound_plaintext", settings.listen.inbound_plaintext, PlaintextInboundHandler(self).handle),
        )
        try:
            for name, address, handler in listeners:
                if address is None:
                    continue
                try:
                    sock = listening_socket(address, settings.listen.transparent)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {address[0]}:{address[1]} (listen.{name}): "
                                       f"{exc.strerror}; {_listen_hint(exc, settings.listen.transparent)}"
                                       ) from None
                self.bound[name] = sock.getsockname()[:2]
                self._servers[name] = Listener(name, sock, handler, self.spawn)
        except StartupError:
            for server in self._servers.values():
                server.close()
            raise
        for server in self._servers.values():
            server.start()
        self._reload_task = asyncio.get_event_loop().create_task(self._reload_loop())
        log.info("ztproxy ready on node %s: %s", settings.node_name,
                 ", ".join(f"{n} {a[0]}:{a[1]}" for n, a in self.bound.items()))

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
        for server in self._servers.values():
            server.close()
        sessions = list(self.server_sessions) + list(self.pool.sessions())
        for session in sessions:
            session.goaway()
        log.info("draining: %d connection(s) open, deadline %.1fs", len(self._active), timeout)
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        remaining = len(self._active)
        if remaining:
            log.warning("drain deadline reached: closing %d connection(s) still open", remaining)
        for connection in list(self._active):
            if hasattr(connection, "on_session_lost"):
                connection.on_session_lost("proxy shutting down")
            else:
                connection.close("proxy shutting down", abort=True)
        for session in list(self.server_sessions) + list(self.pool.sessions()):
            session.close()
        if self._reload_task is not None:
            self._reload_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        return remaining == 0

    async def serve(self) -> bool:
        """Run until SIGTERM/SIGINT, then drain. Returns drain()'s result."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining (deadline %.1fs)", self.settings.drain_timeout)
        return await self.drain()
