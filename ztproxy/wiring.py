"""A whole ztproxy node: the data plane (ztproxy.app.App) built with authorization and telemetry, plus
the DNS proxy and the admin, metrics and readiness servers.

    node = ProxyNode(settings, NodeServices.from_dict(raw.get("services", {})))
    clean = await node.serve()      # until SIGTERM/SIGINT or POST /quitquitquit, then drain

Start order is chosen for the readiness probe: the metrics and readiness servers come up first (and
answer 503), then the data plane, then DNS and admin; readiness turns 200 only when the mesh state and
every local identity's certificate are loaded and the listeners are up, and turns 503 again as soon as a
drain starts, so a load balancer or the node's DNS capture stops sending work before listeners close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ztproxy.admin import (
    ADMIN_ADDRESS,
    METRICS_ADDRESS,
    READINESS_ADDRESS,
    HttpServer,
    admin_routes,
    metrics_routes,
    readiness_routes,
)
from ztproxy.app import App, StartupError
from ztproxy.authz import MeshAuthorizer
from ztproxy.certs import CertError, IdentityFiles
from ztproxy.config import Settings, parse_host_port
from ztproxy.dns import (
    DEFAULT_DOMAIN,
    DNS_PORT,
    RESOLV_CONF,
    DnsConfigError,
    DnsMetrics,
    DnsProxy,
    parse_upstream,
    read_resolv_conf,
)
from ztproxy.hooks import ConnContext, Decision
from ztproxy.telemetry import (
    ACCESS_LOG_FORMATS,
    AccessLog,
    Telemetry,
    TrafficMetrics,
    configure_access_log,
    new_registry,
    service_lookup_from,
)

log = logging.getLogger("ztproxy")

Address = Optional[Tuple[str, int]]


class NodeServicesError(ValueError):
    """A bad key in the services settings; the message names it and says what to write."""


@dataclass(frozen=True)
class NodeServices:
    """Settings of what runs beside the data plane. Every default is ztunnel's port or behaviour."""

    admin: Address = ADMIN_ADDRESS
    metrics: Address = METRICS_ADDRESS
    readiness: Address = READINESS_ADDRESS
    dns: Address = ("0.0.0.0", DNS_PORT)  # None: no DNS proxy
    dns_upstreams: Tuple[Tuple[str, int], ...] = ()  # empty: the nameservers of dns_resolv_conf
    dns_resolv_conf: str = RESOLV_CONF  # the node's ORIGINAL resolv.conf
    dns_search_domains: Optional[Tuple[str, ...]] = None  # None: the search line of dns_resolv_conf
    dns_domain: str = DEFAULT_DOMAIN
    access_log_format: Optional[str] = None  # None: through the proxy's log handler; text/json: own stream
    access_log_open: bool = False  # also log a line when a connection opens

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> NodeServices:
        """Validate a settings mapping (keys as the field names; addresses as 'IP:PORT' or null)."""
        data = dict(data or {})
        values: Dict[str, Any] = {}
        for key in ("admin", "metrics", "readiness", "dns"):
            if key in data:
                raw = data.pop(key)
                try:
                    values[key] = None if raw is None else parse_host_port(str(raw), allow_zero=True)
                except ValueError:
                    raise NodeServicesError(f"'{key}': {raw!r} is not 'IP:PORT' ('[IPv6]:PORT') or null") \
                        from None
        if "dns_upstreams" in data:
            raw = data.pop("dns_upstreams")
            if not isinstance(raw, list):
                raise NodeServicesError("'dns_upstreams': expected a list such as "
                                        "['192.0.2.53', '[2001:db8::53]:53']")
            try:
                values["dns_upstreams"] = tuple(parse_upstream(str(u)) for u in raw)
            except DnsConfigError as exc:
                raise NodeServicesError(f"'dns_upstreams': {exc}") from None
        for key in ("dns_resolv_conf", "dns_domain"):
            if key in data:
                raw = data.pop(key)
                if not isinstance(raw, str) or not raw:
                    raise NodeServicesError(f"'{key}': expected a non-empty string, got {raw!r}")
                values[key] = raw
        if "dns_search_domains" in data:
            raw = data.pop("dns_search_domains")
            if raw is not None and (not isinstance(raw, list) or not all(isinstance(d, str) for d in raw)):
                raise NodeServicesError("'dns_search_domains': expected a list of domains, or null to use "
                                        "the resolv.conf search line")
            values["dns_search_domains"] = None if raw is None else tuple(raw)
        if "access_log_format" in data:
            raw = data.pop("access_log_format")
            if raw is not None and raw not in ACCESS_LOG_FORMATS:
                raise NodeServicesError(f"'access_log_format': {raw!r} is not one of text, json (or null)")
            values["access_log_format"] = raw
        if "access_log_open" in data:
            raw = data.pop("access_log_open")
            if not isinstance(raw, bool):
                raise NodeServicesError(f"'access_log_open': expected true or false, got {raw!r}")
            values["access_log_open"] = raw
        if data:
            known = ", ".join(cls.__dataclass_fields__)
            raise NodeServicesError(f"unknown key(s) {', '.join(sorted(map(str, data)))}; known: {known}")
        return cls(**values)


class RecordingAuthorizer:
    """The Authorizer handed to the data plane: decides with MeshAuthorizer and, for a denial, records the
    connection through the observer (opened, then closed with the reason), because the data plane only
    opens a tracker for connections it goes on to proxy. So a denied connection appears in
    ``istio_tcp_connections_failed_total`` and in the access log with its reason, as in ztunnel."""

    def __init__(self, authorizer: MeshAuthorizer, telemetry: Telemetry) -> None:
        self.authorizer = authorizer
        self.telemetry = telemetry

    def authorize(self, conn: ConnContext) -> Decision:
        decision = self.authorizer.authorize(conn)
        if not decision.allowed:
            self.telemetry.opened(conn).closed(decision.reason)
        return decision


class ProxyNode:
    """Everything one node runs: App (ports 15001/15006/15008), DNS (15053), admin (15000), metrics
    (15020) and readiness (15021)."""

    def __init__(self, settings: Settings, services: Optional[NodeServices] = None) -> None:
        self.settings = settings
        self.services = services or NodeServices()
        self.registry = new_registry()
        self.traffic = TrafficMetrics(self.registry)
        self.telemetry = Telemetry(self.traffic, AccessLog(self.services.access_log_open),
                                   service_lookup_from(self.mesh_state))
        self.authorizer = MeshAuthorizer(state_provider=self.mesh_state)
        self.app = App(settings, authorizer=RecordingAuthorizer(self.authorizer, self.telemetry),
                       observer=self.telemetry)
        self.dns: Optional[DnsProxy] = None
        self.dns_bound: List[Tuple[str, int]] = []
        self.servers: Dict[str, HttpServer] = {}
        self._stop: Optional[asyncio.Event] = None
        self._started = False

    # -- providers -----------------------------------------------------------------------------------

    def mesh_state(self) -> Any:
        watcher = self.app.state_watcher
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
        if self.app.draining:
            return ["drain in progress"]
        waiting = []
        if self.mesh_state() is None:
            waiting.append("mesh state")
        if not self._started:
            waiting.append("listeners")
        for identity, _, _ in self.local_identities():
            try:
                self.app.certs.get(identity)
            except CertError:
                waiting.append(f"certificate of {identity}")
        if self.services.dns is not None and not self.dns_bound:
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
        services = self.services
        self._stop = asyncio.Event()
        if services.access_log_format is not None:
            configure_access_log(services.access_log_format)
        for name, address, routes in (("metrics", services.metrics, metrics_routes(self.registry)),
                                      ("readiness", services.readiness, readiness_routes(self.pending))):
            if address is not None:
                await self._serve_http(name, address, routes)
        try:
            await self.app.start()
            if services.dns is not None:
                await self._start_dns(services.dns)
        except BaseException:
            await self.close()
            if self.app.bound:
                await self.app.drain(0)
            raise
        if services.admin is not None:
            routes = admin_routes(settings=lambda: {"proxy": self.settings, "services": self.services},
                                  mesh_state=self.mesh_state, certificates=self.certificates,
                                  on_quit=self.request_stop,
                                  extra={"policies": lambda: sorted(self.authorizer.index.by_key)})
            await self._serve_http("admin", services.admin, routes)
        self._started = True

    async def _serve_http(self, name: str, address: Tuple[str, int], routes: Any) -> None:
        server = HttpServer(name, routes)
        try:
            await server.start(*address)
        except OSError as exc:
            await self.close()
            if self.app.bound:
                await self.app.drain(0)
            raise StartupError(f"cannot listen on {address[0]}:{address[1]} ({name}): {exc.strerror}; "
                               f"free the port or change the '{name}' setting") from None
        self.servers[name] = server

    async def _start_dns(self, address: Tuple[str, int]) -> None:
        services = self.services
        try:
            if services.dns_upstreams:
                upstreams, search = list(services.dns_upstreams), ()
            else:
                conf = read_resolv_conf(services.dns_resolv_conf)
                upstreams, search = list(conf.nameservers), conf.search
        except DnsConfigError as exc:
            raise StartupError(f"DNS proxy: {exc}") from None
        if services.dns_search_domains is not None:
            search = services.dns_search_domains
        if any(port == address[1] and ip in (address[0], "127.0.0.1", "::1") for ip, port in upstreams):
            raise StartupError(f"DNS proxy: an upstream ({upstreams}) is the proxy's own address {address}; "
                               "point 'dns_resolv_conf' at the node's original resolv.conf")
        self.dns = DnsProxy(upstreams, DnsMetrics(self.registry), search_domains=search,
                            domain=services.dns_domain, state_provider=self.mesh_state)
        try:
            self.dns_bound = await self.dns.start([address])
        except OSError as exc:
            raise StartupError(f"DNS proxy: cannot listen on {address[0]}:{address[1]}: {exc.strerror}") \
                from None

    def request_stop(self) -> None:
        """Start a graceful stop (what SIGTERM and POST /quitquitquit do)."""
        if self._stop is not None:
            self._stop.set()

    async def close(self) -> None:
        if self.dns is not None:
            await self.dns.close()
        for server in list(self.servers.values()):
            await server.close()
        self.servers.clear()

    async def stop(self, timeout: Optional[float] = None) -> bool:
        """Drain the data plane (readiness answers 503 from the first moment), then close everything."""
        clean = await self.app.drain(timeout)
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

