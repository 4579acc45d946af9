"""DNS proxy (port 15053, UDP and TCP): mesh names answered locally, everything else forwarded.

Behaviour mirrors ztunnel's DNS proxy (``src/dns/server.rs``):

* A and AAAA queries for a service hostname are answered with its VIPs (a service without VIPs whose
  hostname is under ``svc.<domain>`` is a headless service: its endpoints' addresses), TTL 30 s,
  authoritative. A name the mesh knows but without an address of the asked family gets an empty
  NOERROR answer, not NXDOMAIN.
* The name is tried as asked, then in its Kubernetes-style expansions relative to the client's
  namespace (``svc`` -> ``svc.<ns>.svc.<domain>``, ``svc.ns`` -> ``svc.ns.svc.<domain>``,
  ``svc.ns.svc`` -> ``svc.ns.svc.<domain>``), then with a configured search domain stripped (answered
  with a CNAME to the stripped name, as ztunnel does) or appended (``svc`` + ``ns.svc.cluster.local``).
  Wildcard hostnames (``*.example.com``) match as in ztunnel. The client is the workload owning the
  query's source address; a client without a namespace (loopback: an operator inside the proxy's
  namespace) gets every form but the namespace-relative ones.
* ztmesh addition: a workload is also reachable as ``<name>.<namespace>.svc.<domain>`` (so ``web-1``
  resolves for clients in its namespace), unless a service already has that hostname.
* Every other query (other types, unknown names) is forwarded to the node's original resolvers in order;
  the upstream's answer is passed through as is (NXDOMAIN, SERVFAIL, REFUSED...), a truncated UDP answer
  is retried over TCP, and an answer too large for the client's UDP size is returned truncated (TC) so
  the client retries over TCP. When no upstream answers, the client gets SERVFAIL.

* Only the node's own workloads are answered (plus loopback, which cannot come from off the node):
  a query from any other source gets nothing back, not even REFUSED, and a TCP connection from one is
  closed before anything is read. Otherwise anyone able to route a datagram to the proxy had an open
  recursive resolver (with about 80 times UDP amplification). ztunnel's DNS proxy, bound inside each
  pod, serves that pod only.

dnspython does all message parsing and rendering.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztproxy.config import DEFAULT_DNS_DOMAIN
from ztproxy.telemetry import CounterFamily, FamilyCollector, HistogramFamily

log = logging.getLogger("ztproxy.dns")

# The listen address (port 15053) is a setting: ztproxy/config.py, Listeners.dns.
DEFAULT_TTL = 30  # ztunnel's DEFAULT_TTL_SECONDS
UPSTREAM_TIMEOUT = 2.0  # per upstream attempt
TCP_IDLE_TIMEOUT = 5.0  # ztunnel's DEFAULT_TCP_REQUEST_TIMEOUT
MAX_INFLIGHT_UDP = 1024  # queries being answered at once; beyond it, UDP queries are dropped
RESOLV_CONF = "/etc/resolv.conf"
SYSTEMD_RESOLVED_UPSTREAMS = "/run/systemd/resolve/resolv.conf"
# ztunnel's buckets (sorted; prometheus requires ascending bounds).
UPSTREAM_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.1, 1.0, 5.0)
DNS_LABELS = ("request_query_type", "request_protocol", "source_canonical_service",
              "source_canonical_revision")


class DnsConfigError(ValueError):
    """Unusable DNS settings (upstreams, resolv.conf); the message says what to change."""


# --------------------------------------------------------------------------------------------------
# Upstreams from the node's original resolv.conf


@dataclass(frozen=True)
class ResolvConf:
    nameservers: Tuple[Tuple[str, int], ...]
    search: Tuple[str, ...]
    path: str


def _parse_resolv_conf(path: str) -> ResolvConf:
    servers: List[Tuple[str, int]] = []
    search: List[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            words = line.split("#", 1)[0].split(";", 1)[0].split()
            if not words:
                continue
            if words[0] == "nameserver" and len(words) >= 2:
                address = words[1].split("%", 1)[0]  # drop an IPv6 zone index
                try:
                    servers.append((str(ipaddress.ip_address(address)), 53))
                except ValueError:
                    log.warning("%s: ignoring nameserver %r (not an IP address)", path, words[1])
            elif words[0] in ("search", "domain"):
                search = [w.rstrip(".").lower() for w in words[1:]]
    return ResolvConf(tuple(servers), tuple(search), path)


def read_resolv_conf(path: str = RESOLV_CONF, resolved_path: str = SYSTEMD_RESOLVED_UPSTREAMS) -> ResolvConf:
    """Nameservers and search domains of the node's original resolver configuration.

    A resolv.conf that only names the systemd-resolved stub (127.0.0.53) is useless from the proxy's
    network namespace, where that loopback address is not the host's: the real upstreams are then read
    from systemd-resolved's own list.
    """
    try:
        conf = _parse_resolv_conf(path)
    except OSError as exc:
        raise DnsConfigError(f"cannot read {path}: {exc.strerror}; set the DNS upstreams explicitly") \
            from None
    loopback_only = bool(conf.nameservers) and all(
        ipaddress.ip_address(ip).is_loopback for ip, _ in conf.nameservers
    )
    if loopback_only and os.path.exists(resolved_path):
        try:
            resolved = _parse_resolv_conf(resolved_path)
        except OSError:
            resolved = None
        if resolved and resolved.nameservers:
            log.info("%s names only a local stub; using the upstreams of %s", path, resolved_path)
            return ResolvConf(resolved.nameservers, conf.search or resolved.search, resolved_path)
    if not conf.nameservers:
        raise DnsConfigError(f"{path} names no nameserver; set the DNS upstreams explicitly")
    return conf


def parse_upstream(text: str) -> Tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT``."""
    text = text.strip()
    try:
        if text.startswith("["):
            host, _, port = text[1:].partition("]")
            port = port.lstrip(":") or "53"
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:
            host, port = text, "53"
        ip = str(ipaddress.ip_address(host))
        number = int(port)
    except ValueError:
        raise DnsConfigError(f"DNS upstream {text!r}: expected IP, IP:PORT or [IPv6]:PORT") from None
    if not 1 <= number <= 65535:
        raise DnsConfigError(f"DNS upstream {text!r}: port must be 1-65535")
    return ip, number


# --------------------------------------------------------------------------------------------------
# The name table


@dataclass(frozen=True)
class HostRecord:
    """A name the mesh answers for."""

    hostname: str  # lower case, no trailing dot; may start with "*."
    namespace: str
    kind: str  # "service" | "workload"
    addresses: Tuple[str, ...]


@dataclass(frozen=True)
class Client:
    namespace: str
    canonical_service: str = ""
    canonical_revision: str = ""


@dataclass
class NameTable:
    domain: str = DEFAULT_DNS_DOMAIN
    hosts: Dict[str, List[HostRecord]] = field(default_factory=dict)
    clients: Dict[str, Client] = field(default_factory=dict)
    # Addresses of this node's own workloads: the only clients answered (besides loopback).
    local_clients: FrozenSet[str] = frozenset()

    def serves(self, ip: str) -> bool:
        """Whether a query from ``ip`` is answered at all. As ztunnel's DNS proxy, only the node's own
        workloads are: captured DNS always comes from one of them (the node captures DNS whose source
        is in its ipset), while anyone else who can route a datagram to the proxy would otherwise get a
        recursive resolver that answers spoofed sources, about 80 times larger than the query.
        Loopback stays allowed: it cannot come from off the node (the kernel drops such sources as
        martians) and is how an operator asks the proxy inside its namespace."""
        normal = _normal_ip(ip)
        if normal in self.local_clients:
            return True
        try:
            return ipaddress.ip_address(normal).is_loopback
        except ValueError:
            return False

    def client(self, ip: str) -> Optional[Client]:
        return self.clients.get(_normal_ip(ip))

    def find(self, hostname: str, client_namespace: Optional[str]) -> Optional[HostRecord]:
        """The record for ``hostname``; several namespaces may define one hostname (ServiceEntry), then
        the client's namespace wins, else the first."""
        records = self.hosts.get(hostname)
        if not records:
            return None
        for record in records:
            if record.namespace == client_namespace:
                return record
        return records[0]


def _normal_ip(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def build_name_table(state: Any, domain: str = DEFAULT_DNS_DOMAIN, node: Optional[str] = None) -> NameTable:
    """The names of a mesh state (ztproxy.state.MeshState): services, then workloads; ``node``: this
    node's name, whose workloads are the clients served."""
    domain = domain.strip(".").lower()
    svc_suffix = f".svc.{domain}"
    workloads = list(getattr(state, "workloads", ()) or ())
    table = NameTable(domain=domain, local_clients=frozenset(
        _normal_ip(ip) for w in workloads if node is not None and w.node == node for ip in w.workload_ips))
    by_uid = {w.uid: w for w in workloads}
    for service in getattr(state, "services", ()) or ():
        hostname = service.hostname.rstrip(".").lower()
        addresses: Tuple[str, ...] = tuple(service.vips)
        if not addresses:
            if not hostname.endswith(svc_suffix):
                continue  # no VIP and not a headless service: forwarded, as in ztunnel
            found: List[str] = []
            for uid in service.endpoints:
                workload = by_uid.get(uid)
                if workload is None:
                    continue
                for family in (4, 6):  # one address per family per endpoint, as ztunnel
                    ip = next((a for a in workload.workload_ips if ipaddress.ip_address(a).version == family),
                              None)
                    if ip is not None:
                        found.append(ip)
            addresses = tuple(found)
        table.hosts.setdefault(hostname, []).append(HostRecord(hostname, service.namespace, "service",
                                                               addresses))
    for workload in workloads:
        for ip in workload.workload_ips:
            table.clients.setdefault(_normal_ip(ip), Client(workload.namespace, workload.canonical_name,
                                                            workload.canonical_revision))
        if not workload.name or not workload.workload_ips:
            continue
        hostname = f"{workload.name}.{workload.namespace}{svc_suffix}".lower()
        if any(r.kind == "service" for r in table.hosts.get(hostname, ())):
            continue  # services win, as ztunnel looks services up first
        table.hosts.setdefault(hostname, []).append(HostRecord(hostname, workload.namespace, "workload",
                                                               tuple(workload.workload_ips)))
    return table


@dataclass(frozen=True)
class Alias:
    name: str
    stripped: Optional[str] = None  # set when produced by stripping a search domain


@dataclass(frozen=True)
class LocalAnswer:
    record: HostRecord
    matched: str  # the table key that matched (may be a wildcard)
    alias: Alias


class Resolver:
    """Finds a mesh name for a query, as ztunnel's Store::find_server."""

    def __init__(self, table: NameTable, search_domains: Sequence[str] = ()) -> None:
        self.table = table
        self.search_domains = tuple(d.strip(".").lower() for d in search_domains if d.strip("."))

    def aliases(self, name: str, client_namespace: Optional[str]) -> List[Alias]:
        out: List[Alias] = []
        seen = set()

        def add(alias: Alias) -> None:
            if alias.name not in seen:
                seen.add(alias.name)
                out.append(alias)

        add(Alias(name))
        for expanded in self._kube_fqdns(name, client_namespace):
            add(Alias(expanded))
        for domain in self.search_domains:
            if name.endswith("." + domain):
                stripped = name[: -len(domain) - 1]
                add(Alias(stripped, stripped))
                for expanded in self._kube_fqdns(stripped, client_namespace):
                    add(Alias(expanded, stripped))
        for domain in self.search_domains:
            add(Alias(f"{name}.{domain}"))
        return out

    def _kube_fqdns(self, name: str, client_namespace: Optional[str]) -> List[str]:
        labels = name.split(".")
        svc_domain = f"svc.{self.table.domain}"
        if len(labels) == 1:
            return [f"{name}.{client_namespace}.{svc_domain}"] if client_namespace else []
        if len(labels) == 2:
            return [f"{name}.{svc_domain}"]
        if len(labels) == 3 and labels[2] == "svc":
            return [f"{name}.{self.table.domain}"]
        return []

    def find(self, qname: str, client_namespace: Optional[str]) -> Optional[LocalAnswer]:
        name = qname.rstrip(".").lower()
        if not name:
            return None
        for alias in self.aliases(name, client_namespace):
            for candidate in _wildcards(alias.name):
                record = self.table.find(candidate, client_namespace)
                if record is not None:
                    return LocalAnswer(record, candidate, alias)
        return None


def _wildcards(name: str) -> List[str]:
    """``a.b.c`` -> ``a.b.c``, ``*.b.c``, ``*.c``."""
    out = [name]
    labels = name.split(".")
    for i in range(len(labels) - 1):
        out.append("*." + ".".join(labels[i + 1 :]))
    return out


# --------------------------------------------------------------------------------------------------
# Metrics


class DnsMetrics:
    def __init__(self, registry: Any) -> None:
        self.requests = CounterFamily("istio_dns_requests", "Total number of DNS requests", DNS_LABELS)
        self.upstream_requests = CounterFamily(
            "istio_dns_upstream_requests", "Total number of DNS requests forwarded to upstream", DNS_LABELS
        )
        self.upstream_failures = CounterFamily(
            "istio_dns_upstream_failures", "Total number of DNS requests that failed to forward upstream",
            DNS_LABELS,
        )
        self.upstream_duration = HistogramFamily(
            "istio_dns_upstream_request_duration_seconds",
            "Total time in seconds Istio takes to get DNS response from upstream",
            DNS_LABELS, UPSTREAM_DURATION_BUCKETS,
        )
        registry.register(FamilyCollector([self.requests, self.upstream_requests, self.upstream_failures,
                                           self.upstream_duration]))


# --------------------------------------------------------------------------------------------------
# The proxy


def _udp_limit(query: dns.message.Message) -> int:
    """The largest UDP answer the client accepts (RFC 6891: EDNS payload size, else 512)."""
    return max(512, query.payload) if query.edns >= 0 else 512


def _fit(response: dns.message.Message, limit: int) -> bytes:
    """Render ``response`` within ``limit`` bytes; when it does not fit, send the header and question
    with TC set, which tells the client to ask again over TCP."""
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        truncated = dns.message.Message(id=response.id)
        truncated.flags = response.flags | dns.flags.TC
        truncated.set_rcode(response.rcode())
        truncated.question = list(response.question)
        if response.edns >= 0:
            truncated.use_edns(response.edns, response.ednsflags, response.payload)
        return truncated.to_wire(max_size=limit)


class DnsProxy:
    """The DNS server: ``handle(wire, client_ip, protocol)`` answers one query; ``start`` binds
    UDP and TCP listeners. ``update_state(state)`` swaps in the names of a new mesh state."""

    def __init__(
        self,
        upstreams: Sequence[Tuple[str, int]],
        metrics: DnsMetrics,
        search_domains: Sequence[str] = (),
        domain: str = DEFAULT_DNS_DOMAIN,
        state: Any = None,
        timeout: float = UPSTREAM_TIMEOUT,
        ttl: int = DEFAULT_TTL,
        state_provider: Optional[Callable[[], Any]] = None,
        node: Optional[str] = None,
    ) -> None:
        if not upstreams:
            raise DnsConfigError("the DNS proxy needs at least one upstream resolver to forward to")
        self.upstreams = [(str(ipaddress.ip_address(ip)), int(port)) for ip, port in upstreams]
        self.metrics = metrics
        self.search_domains = tuple(search_domains)
        self.domain = domain
        self.timeout = timeout
        self.ttl = ttl
        # Only this node's workloads (and loopback) are answered: NameTable.serves. Without a node name
        # (a proxy serving no node) that leaves loopback alone.
        self.node = node
        self.refused = 0  # queries from other sources, dropped unanswered
        self.resolver = Resolver(NameTable(domain=domain), self.search_domains)
        # With a provider, the names follow the mesh state: each query checks (by identity, so for free)
        # whether the state object changed since the table was built.
        self._state_provider = state_provider
        self._state: Any = None
        if state is not None:
            self.update_state(state)
        self._udp_transports: List[asyncio.DatagramTransport] = []
        self._tcp_servers: List[asyncio.AbstractServer] = []
        # Open TCP connections' handlers: server.close() does not end them (Python < 3.12).
        self._tcp_handlers: Set[asyncio.Task] = set()
        self._inflight = 0
        self._tasks: set = set()

    def update_state(self, state: Any) -> None:
        self._state = state
        table = build_name_table(state, self.domain, self.node)
        self.resolver = Resolver(table, self.search_domains)
        log.info("DNS names loaded: %d", len(table.hosts))

    # -- answering -----------------------------------------------------------------------------------

    async def handle(self, wire: bytes, client_ip: str, protocol: str) -> Optional[bytes]:
        """The answer to one query (None: nothing is sent back: a source that is not a workload of this
        node, or not even a header)."""
        self._follow_state()
        if not self.resolver.table.serves(client_ip):
            self._refuse(client_ip, protocol)
            return None
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException as exc:
            log.debug("malformed DNS query from %s: %s", client_ip, exc)
            return _formerr(wire)
        limit = _udp_limit(query) if protocol == "udp" else 65535
        if query.flags & dns.flags.QR:
            return None  # a response sent to us: never answer it (loops)
        client = self.resolver.table.client(client_ip)
        qtype = "none"
        if len(query.question) == 1:
            qtype = dns.rdatatype.to_text(query.question[0].rdtype).lower()
        labels = (qtype, protocol, _or_unknown(client.canonical_service if client else ""),
                  _or_unknown(client.canonical_revision if client else ""))
        self.metrics.requests.inc(labels)

        local = self._local_answer(query, client)
        if local is not None:
            return _fit(local, limit)
        response = await self._forward(query, protocol, labels)
        if response is None:
            failed = dns.message.make_response(query)
            failed.set_rcode(dns.rcode.SERVFAIL)
            failed.flags |= dns.flags.RA
            return _fit(failed, limit)
        response.id = query.id
        return _fit(response, limit)

    def _follow_state(self) -> None:
        if self._state_provider is not None:
            state = self._state_provider()
            if state is not None and state is not self._state:
                self.update_state(state)

    def _refuse(self, client_ip: str, protocol: str) -> None:
        # Nothing is sent back, not even REFUSED: an answer to a spoofed UDP source is still a
        # reflection. Logged at debug only, since a flood must not flood the log too.
        self.refused += 1
        log.debug("DNS query over %s from %s dropped: not a workload of node %s", protocol, client_ip,
                  self.node or "(none)")

    def _local_answer(
        self, query: dns.message.Message, client: Optional[Client]
    ) -> Optional[dns.message.Message]:
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return None
        question = query.question[0]
        address_query = question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        if question.rdclass != dns.rdataclass.IN or not address_query:
            return None
        found = self.resolver.find(question.name.to_text(), client.namespace if client else None)
        if found is None:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        owner = question.name
        if found.alias.stripped is not None and not found.matched.startswith("*."):
            target = dns.name.from_text(found.alias.stripped)
            response.answer.append(dns.rrset.from_text(owner, self.ttl, "IN", "CNAME", target.to_text()))
            owner = target
        version = 4 if question.rdtype == dns.rdatatype.A else 6
        addresses = [a for a in found.record.addresses if ipaddress.ip_address(a).version == version]
        random.shuffle(addresses)  # as ztunnel, spread clients over the addresses
        if addresses:
            rdtype = "A" if version == 4 else "AAAA"
            response.answer.append(dns.rrset.from_text_list(owner, self.ttl, "IN", rdtype, addresses))
        log.debug("answered %s %s from the mesh state: %s", question.name,
                  dns.rdatatype.to_text(question.rdtype), addresses or "no records of that type")
        return response

    async def _forward(self, query: dns.message.Message, protocol: str, labels: Tuple[str, ...]
                       ) -> Optional[dns.message.Message]:
        self.metrics.upstream_requests.inc(labels)
        started = time.monotonic()
        try:
            for ip, port in self.upstreams:
                try:
                    if protocol == "tcp":
                        return await dns.asyncquery.tcp(query, ip, timeout=self.timeout, port=port)
                    response = await dns.asyncquery.udp(query, ip, timeout=self.timeout, port=port,
                                                        ignore_unexpected=True)
                    if response.flags & dns.flags.TC:
                        log.debug("upstream %s:%d truncated the answer; asking again over TCP", ip, port)
                        response = await dns.asyncquery.tcp(query, ip, timeout=self.timeout, port=port)
                    return response
                except (dns.exception.DNSException, OSError, EOFError) as exc:
                    log.warning("DNS upstream %s:%d failed for %s: %s", ip, port,
                                query.question[0].name if query.question else "?", exc or type(exc).__name__)
            self.metrics.upstream_failures.inc(labels)
            return None
        finally:
            self.metrics.upstream_duration.observe(labels, time.monotonic() - started)

    # -- serving -------------------------------------------------------------------------------------

    async def start(self, addresses: Iterable[Tuple[str, int]]) -> List[Tuple[str, int]]:
        """Listen on UDP and TCP at each (ip, port); returns the bound (ip, port) of each listener pair."""
        loop = asyncio.get_running_loop()
        bound = []
        for host, port in addresses:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port)
            )
            self._udp_transports.append(transport)
            udp_port = transport.get_extra_info("sockname")[1]
            server = await asyncio.start_server(self._serve_tcp, host, udp_port)
            self._tcp_servers.append(server)
            bound.append((host, udp_port))
            log.info("DNS proxy listening on %s:%d (UDP and TCP), forwarding to %s", host, udp_port,
                     ", ".join(f"{i}:{p}" for i, p in self.upstreams))
        return bound

    async def close(self) -> None:
        for transport in self._udp_transports:
            transport.close()
        for server in self._tcp_servers:
            server.close()
        # End the open TCP connections while the loop still runs: left to the loop's teardown, their
        # transports detach from an already closed server, which Python 3.11's asyncio.Server trips
        # over (TypeError in Server._wakeup, fixed in 3.12).
        handlers = list(self._tcp_handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        for server in self._tcp_servers:
            await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        self._udp_transports.clear()
        self._tcp_servers.clear()

    def _spawn_udp(self, transport: asyncio.DatagramTransport, data: bytes, addr: Tuple[Any, ...]) -> None:
        if self._inflight >= MAX_INFLIGHT_UDP:
            log.warning("DNS proxy overloaded: dropping a UDP query from %s", addr[0])
            return
        self._inflight += 1
        task = asyncio.ensure_future(self._answer_udp(transport, data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_udp(
        self, transport: asyncio.DatagramTransport, data: bytes, addr: Tuple[Any, ...]
    ) -> None:
        try:
            answer = await self.handle(data, addr[0], "udp")
            if answer is not None and not transport.is_closing():
                transport.sendto(answer, addr)
        except Exception:  # one bad query must not stop the server
            log.exception("DNS query from %s failed", addr[0])
        finally:
            self._inflight -= 1

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        handler = asyncio.current_task()
        if handler is not None:
            self._tcp_handlers.add(handler)
        try:
            self._follow_state()
            if not self.resolver.table.serves(str(peer[0])):
                self._refuse(str(peer[0]), "tcp")
                return  # closed before reading anything
            while True:
                try:
                    header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    (length,) = struct.unpack("!H", header)
                    data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                answer = await self.handle(data, peer[0], "tcp")
                if answer is None:
                    return
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except ConnectionError:
            return
        except Exception:
            log.exception("DNS TCP connection from %s failed", peer[0])
        finally:
            self._tcp_handlers.discard(handler)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Tuple[Any, ...]) -> None:
        if self.transport is not None:
            self.proxy._spawn_udp(self.transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS UDP socket error: %s", exc)


def _or_unknown(value: str) -> str:
    return value or "unknown"


def _formerr(wire: bytes) -> Optional[bytes]:
    """FORMERR for a query we cannot parse, if it at least carries an ID to answer to."""
    if len(wire) < 2:
        return None
    response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    response.flags = dns.flags.QR
    response.set_rcode(dns.rcode.FORMERR)
    return response.to_wire()

