"""The app: the process that starts everything of one ztproxy node (ztunnel's app.rs). The data plane
(ztproxy.proxy.Proxy) built with authorization and telemetry, plus the DNS proxy, the admin, metrics and
readiness servers and, when the settings name a CA, the online certificate renewer. This is what
``ztproxy run`` serves.

    node = App(load_settings(path))
    clean = await node.serve()      # until SIGTERM/SIGINT or POST /quitquitquit, then drain

Every setting comes from ztproxy.config.Settings (one settings file, one config module).

Start order is chosen for the readiness probe: the metrics and readiness servers come up first (and
answer 503), then the data plane, then DNS and admin; readiness turns 200 only when the mesh state and
every local identity's certificate are loaded and the listeners are up, and turns 503 again as soon as a
drain starts, so a load balancer or the node's DNS capture stops sending work before listeners close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Dict, List, Optional, Tuple

from ztproxy.admin import HttpServer, admin_routes, metrics_routes, readiness_routes
from ztproxy.authz import MeshAuthorizer
from ztproxy.certs import CertError, IdentityFiles
from ztproxy.config import Settings, settings_to_dict
from ztproxy.dns import DnsConfigError, DnsMetrics, DnsProxy, read_resolv_conf
from ztproxy.hooks import ConnContext, Decision, Failure, Reason
from ztproxy.proxy import Proxy, StartupError
from ztproxy.telemetry import (
    AccessLog,
    Telemetry,
    TrafficMetrics,
    configure_access_log,
    new_registry,
    service_lookup_from,
)

log = logging.getLogger("ztproxy")


class RecordingAuthorizer:
    """The Authorizer handed to the data plane: decides with MeshAuthorizer and, for a denial, records the
    connection through the observer (opened, then closed with the reason and ztunnel's ``DENY`` response
    flag). The data plane opens a tracker only for connections it goes on to proxy (hooks contract), so
    this is the one place a denial is counted: once in ``istio_tcp_connections_opened_total``,
    ``_closed_total`` and ``_failed_total``, and one access-log line with the reason, as in ztunnel."""

    def __init__(self, authorizer: MeshAuthorizer, telemetry: Telemetry) -> None:
        self.authorizer = authorizer
        self.telemetry = telemetry

    def authorize(self, conn: ConnContext) -> Decision:
        decision = self.authorizer.authorize(conn)
        if not decision.allowed:
            self.telemetry.opened(conn).closed(Failure(Reason.DENIED, decision.reason))
        return decision


class App:
    """Everything one node runs: the Proxy (ports 15001/15006/15008), DNS (15053), admin (15000), metrics
    (15020), readiness (15021) and, with ``ca.addresses``, the certificate renewer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = new_registry()
        self.traffic = TrafficMetrics(self.registry)
        self.telemetry = Telemetry(self.traffic, AccessLog(settings.access_log.log_open),
                                   service_lookup_from(self.mesh_state))
        # Follows the data plane's current mesh state (Proxy.state): the policies of the state that routed
        # a connection decide it, also across reloads.
        self.authorizer = MeshAuthorizer(state_provider=self.mesh_state)
        self.proxy = Proxy(settings, authorizer=RecordingAuthorizer(self.authorizer, self.telemetry),
                       observer=self.telemetry)
        self.dns: Optional[DnsProxy] = None
        self.dns_bound: List[Tuple[str, int]] = []
        self.servers: Dict[str, HttpServer] = {}
        self.renewer: Optional[asyncio.Task] = None
        # Renewal status of each identity (metrics, admin endpoint); set when ca.addresses is configured.
        self.renewal: Optional[Any] = None
        self._register_certificate_metrics()
        self._stop: Optional[asyncio.Event] = None
        self._renewer_stop: Optional[asyncio.Event] = None
        self._started = False

    # -- providers -----------------------------------------------------------------------------------

    def held_identities(self) -> List[Any]:
        """The node identity and every identity of this node's workloads: the certificates it holds."""
        from ztproxy.identity.pki import IdentityError, SpiffeId, node_identity

        out = [node_identity(self.settings.trust_domain, self.settings.node_name)]
        for identity, _, _ in self.local_identities():
            try:
                out.append(SpiffeId.parse(identity))
            except IdentityError as exc:
                log.error("cannot follow the certificate of %s: %s", identity, exc)
        return out

    def renewal_status(self) -> Dict[str, Any]:
        """Per identity: remaining lifetime and the renewer's last result (admin /config_dump)."""
        from ztproxy.identity.pki import read_identity, summarize

        statuses = dict(self.renewal.status) if self.renewal is not None else {}
        out: Dict[str, Any] = {}
        for identity in self.held_identities():
            installed = read_identity(self.settings.certs_dir, identity)
            entry: Dict[str, Any] = {"online_renewal": self.renewal is not None}
            if installed is not None:
                summary = summarize(installed[1])
                entry.update(serial=summary.serial, not_after=summary.not_after.isoformat(),
                             remaining_seconds=int(summary.remaining()),
                             lifetime_seconds=int(summary.lifetime))
            else:
                entry["error"] = "no certificate installed"
            if identity in statuses:
                entry.update(statuses[identity].as_dict())
            out[str(identity)] = entry
        return out

    def _register_certificate_metrics(self) -> None:
        try:
            from ztproxy.identity.metrics import CertificateMetrics
        except ImportError:  # the identity extras are missing: the proxy still runs, without these metrics
            log.warning("certificate metrics are off: a package of ztproxy.identity is missing",
                        exc_info=True)
            return
        self.registry.register(CertificateMetrics(self.settings.certs_dir, self.held_identities,
                                                  lambda: self.renewal))

    def mesh_state(self) -> Any:
        watcher = self.proxy.state_watcher
        return watcher.current if watcher is not None else None

    def local_identities(self) -> List[Tuple[str, str, str]]:
        """(identity, namespace, service account) of this node's workloads."""
        state = self.mesh_state()
        if state is None:
            return []
        seen = {}
        for workload in state.local_workloads(self.settings.node_name):
            seen[workload.identity] = (workload.identity, workload.namespace, workload.service_account)
        return [seen[k] for k in sorted(seen)]

    def pending(self) -> List[str]:
        """What keeps the node from being ready (empty: ready)."""
        if self.proxy.draining:
            return ["drain in progress"]
        waiting = []
        if self.mesh_state() is None:
            waiting.append("mesh state")
        if not self._started:
            waiting.append("listeners")
        for identity, _, _ in self.local_identities():
            try:
                self.proxy.certs.get(identity)
            except CertError:
                waiting.append(f"certificate of {identity}")
        if self.settings.listen.dns is not None and not self.dns_bound:
            waiting.append("DNS proxy")
        return waiting

    def certificates(self) -> List[Any]:
        """Public certificate chains of the local identities and the trust bundle (PEM); never a key."""
        out: List[Any] = []
        paths = [IdentityFiles.under(self.settings.certs_dir, ns, sa).cert_chain
                 for _, ns, sa in self.local_identities()]
        for path in paths + [self.settings.trust_bundle]:
            try:
                with open(path, "rb") as handle:
                    out.append(handle.read())
            except OSError as exc:
                out.append({"file": path, "error": exc.strerror})
        return out

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        listen = settings.listen
        self._stop = asyncio.Event()
        if settings.access_log.format is not None:
            configure_access_log(settings.access_log.format)
        for name, address, routes in (("metrics", listen.metrics, metrics_routes(self.registry)),
                                      ("readiness", listen.readiness, readiness_routes(self.pending))):
            if address is not None:
                await self._serve_http(name, address, routes)
        try:
            await self.proxy.start()
            if listen.dns is not None:
                await self._start_dns(listen.dns)
            if settings.ca.addresses:
                self._start_renewer()
        except BaseException:
            await self.close()
            if self.proxy.bound:
                await self.proxy.drain(0)
            raise
        if listen.admin is not None:
            routes = admin_routes(settings=lambda: settings_to_dict(self.settings),
                                  mesh_state=self.mesh_state, certificates=self.certificates,
                                  on_quit=self.request_stop,
                                  extra={"policies": lambda: sorted(self.authorizer.index.by_key),
                                         "renewal": self.renewal_status})
            await self._serve_http("admin", listen.admin, routes)
        self._started = True

    async def _serve_http(self, name: str, address: Tuple[str, int], routes: Any) -> None:
        server = HttpServer(name, routes)
        try:
            await server.start(*address)
        except OSError as exc:
            await self.close()
            if self.proxy.bound:
                await self.proxy.drain(0)
            raise StartupError(f"cannot listen on {address[0]}:{address[1]} ({name}): {exc.strerror}; "
                               f"free the port or change the 'listen.{name}' setting") from None
        self.servers[name] = server

    async def _start_dns(self, address: Tuple[str, int]) -> None:
        config = self.settings.dns
        try:
            if config.upstreams:
                upstreams, search = list(config.upstreams), ()
            else:
                conf = read_resolv_conf(config.resolv_conf)
                upstreams, search = list(conf.nameservers), conf.search
        except DnsConfigError as exc:
            raise StartupError(f"DNS proxy: {exc}") from None
        if config.search_domains is not None:
            search = config.search_domains
        if any(port == address[1] and ip in (address[0], "127.0.0.1", "::1") for ip, port in upstreams):
            raise StartupError(f"DNS proxy: an upstream ({upstreams}) is the proxy's own address {address}; "
                               "point 'dns.resolv_conf' at the node's original resolv.conf")
        self.dns = DnsProxy(upstreams, DnsMetrics(self.registry), search_domains=search,
                            domain=config.domain, state_provider=self.mesh_state,
                            node=self.settings.node_name)
        try:
            self.dns_bound = await self.dns.start([address])
        except OSError as exc:
            raise StartupError(f"DNS proxy: cannot listen on {address[0]}:{address[1]}: {exc.strerror}") \
                from None

    def _start_renewer(self) -> None:
        """Online renewal (ztproxy.identity.renewer) of the node identity and of every identity the mesh
        state places on this node; the data plane picks the new files up on its next reload tick."""
        try:
            from ztproxy.identity.renewer import Renewer, RenewerSettings, run_renewer
        except ImportError as exc:
            raise StartupError(f"online renewal ('ca.addresses') needs a missing Python package: {exc}; "
                               "install it or remove 'ca.addresses' to renew through Ansible only") from None

        settings = self.settings
        ca = settings.ca
        renewer_settings = RenewerSettings(
            certs_dir=settings.certs_dir, trust_bundle=settings.trust_bundle, ca_addresses=list(ca.addresses),
            node_name=settings.node_name, trust_domain=settings.trust_domain, cert_ttl=ca.cert_ttl,
            renew_fraction=ca.renew_fraction, ca_identity=ca.identity, ca_server_name=ca.server_name,
            token_path=ca.token_file)

        self.renewal = Renewer(renewer_settings)
        self._renewer_stop = asyncio.Event()
        self.renewer = asyncio.get_event_loop().create_task(
            run_renewer(renewer_settings, self.held_identities, self._renewer_stop, renewer=self.renewal))
        log.info("online certificate renewal from %s",
                 ", ".join(f"{host}:{port}" for host, port in ca.addresses))

    def request_stop(self) -> None:
        """Start a graceful stop (what SIGTERM and POST /quitquitquit do)."""
        if self._stop is not None:
            self._stop.set()

    async def close(self) -> None:
        if self.renewer is not None:
            assert self._renewer_stop is not None
            self._renewer_stop.set()
            try:
                await asyncio.wait_for(self.renewer, 5)
            except Exception:  # a renewal in flight is abandoned: the old files stay in place
                log.warning("certificate renewer did not stop in time", exc_info=True)
            self.renewer = None
        if self.dns is not None:
            await self.dns.close()
        for server in list(self.servers.values()):
            await server.close()
        self.servers.clear()

    async def stop(self, timeout: Optional[float] = None) -> bool:
        """Drain the data plane (readiness answers 503 from the first moment), then close everything."""
        clean = await self.proxy.drain(timeout)
        await self.close()
        return clean

    async def serve(self) -> bool:
        """Run until SIGTERM/SIGINT or /quitquitquit, then drain. Returns True for a clean drain."""
        await self.start()
        assert self._stop is not None
        loop = asyncio.get_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (RuntimeError, ValueError, NotImplementedError):
                # Not the main thread (an embedding or a test): /quitquitquit and request_stop() remain.
                log.debug("no handler for %s outside the main thread", sig.name)
        await self._stop.wait()
        log.info("stopping: draining (deadline %.1fs)", self.settings.drain_timeout)
        return await self.stop()

