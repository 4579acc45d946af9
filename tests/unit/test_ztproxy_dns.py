"""DNS proxy on loopback: real queries (dnspython, dig) against ztproxy.dns, forwarding to a real DNS
server started by the test on another loopback port."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import threading
from typing import Any, Dict, List, Tuple

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ztproxy.dns import (
    DnsConfigError,
    DnsMetrics,
    DnsProxy,
    build_name_table,
    parse_upstream,
    read_resolv_conf,
)
from ztproxy.state import parse_mesh_state

pytestmark = pytest.mark.timeout(60)

MESH = {
    "workloads": [
        # Queries from 127.0.0.1 come from this workload: its namespace drives short-name expansion.
        {"uid": "client", "name": "client", "namespace": "shop", "workloadIps": ["127.0.0.1"],
         "canonicalName": "client-app", "canonicalRevision": "v2", "node": "n1"},
        {"uid": "web-1", "name": "web-1", "namespace": "shop", "workloadIps": ["10.0.0.21", "fd00::21"],
         "node": "n1"},
        {"uid": "db-0", "name": "db-0", "namespace": "shop", "workloadIps": ["10.0.0.30"], "node": "n2",
         "services": {"shop/db.shop.svc.cluster.local": {5432: 5432}}},
    ],
    "services": [
        {"name": "web", "namespace": "shop", "hostname": "web.shop.svc.cluster.local",
         "vips": ["/10.96.0.10", "/fd00::10"], "ports": {80: 8080}},
        {"name": "db", "namespace": "shop", "hostname": "db.shop.svc.cluster.local", "vips": [],
         "ports": {5432: 5432}},
        {"name": "ext", "namespace": "shop", "hostname": "external.example.com", "vips": ["/10.96.0.20"],
         "ports": {443: 443}},
        {"name": "wild", "namespace": "shop", "hostname": "*.wild.example.com", "vips": ["/10.96.0.30"],
         "ports": {443: 443}},
        {"name": "novip", "namespace": "shop", "hostname": "novip.example.net", "vips": [], "ports": {}},
    ],
}
SEARCH = ["shop.svc.cluster.local", "corp.example"]


class Upstream:
    """A small authoritative DNS server (UDP and TCP) with canned answers, counting what it is asked."""

    def __init__(self) -> None:
        self.asked: List[Tuple[str, str]] = []  # (protocol, name)

    def answer(self, wire: bytes, protocol: str) -> bytes:
        query = dns.message.from_wire(wire)
        name = query.question[0].name.to_text().rstrip(".").lower()
        self.asked.append((protocol, name))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if name == "nx.example.org":
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif name == "fail.example.org":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name == "big.example.org":
            addresses = [f"198.51.100.{i}" for i in range(1, 121)]
            response.answer.append(dns.rrset.from_text_list(query.question[0].name, 60, "IN", "A", addresses))
        elif query.question[0].rdtype == dns.rdatatype.MX:
            response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "MX",
                                                       "10 mail.example.org."))
        else:
            response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.1"))
        if protocol == "tcp":
            return response.to_wire()
        # Like many real servers, this one caps its UDP answers at 1232 bytes whatever the client offers.
        limit = min(max(512, query.payload), 1232) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer = []
            response.flags |= dns.flags.TC
            return response.to_wire()


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(self.upstream.answer(data, "udp"), addr)


class Harness:
    """An event loop in a thread running the upstream and the proxy, so blocking clients (dig) work."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream = Upstream()
        self.registry = CollectorRegistry()
        self.metrics = DnsMetrics(self.registry)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start_upstream(self) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UpstreamUdp(self.upstream),
                                                           local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]

        async def serve_tcp(reader, writer):
            try:
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    answer = self.upstream.answer(await reader.readexactly(length), "tcp")
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
            except asyncio.IncompleteReadError:
                writer.close()

        self.upstream_tcp = await asyncio.start_server(serve_tcp, "127.0.0.1", port)
        self.upstream_udp = transport
        return port

    def start(self, upstreams: List[Tuple[str, int]] = None) -> Tuple[DnsProxy, int]:
        if upstreams is None:
            upstreams = [("127.0.0.1", self.run(self._start_upstream()))]
        state = parse_mesh_state(MESH, "cluster.local")
        proxy = DnsProxy(upstreams, self.metrics, search_domains=SEARCH, state=state, timeout=1.0)
        (_, port), = self.run(proxy.start([("127.0.0.1", 0)]))
        self.proxies = getattr(self, "proxies", []) + [proxy]
        return proxy, port

    def stop(self) -> None:
        for proxy in getattr(self, "proxies", []):
            self.run(proxy.close())
        if hasattr(self, "upstream_udp"):
            self.upstream_udp.close()
            self.upstream_tcp.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def dnsenv():
    harness = Harness()
    proxy, port = harness.start()
    yield harness, proxy, port
    harness.stop()


def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False, source: str = "127.0.0.1",
        payload: int = 0) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if payload else False, payload=payload or 1232)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=5, source=source)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=5, source=source, ignore_trailing=True)


def records(response: dns.message.Message, rdtype: str = "A") -> List[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(r.to_text() for rrset in response.answer if rrset.rdtype == wanted for r in rrset)


def owners(response: dns.message.Message) -> Dict[str, str]:
    return {rrset.name.to_text(): dns.rdatatype.to_text(rrset.rdtype) for rrset in response.answer}


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_service_names_are_answered_from_the_mesh_state(dnsenv, tcp):
    _, _, port = dnsenv
    response = ask(port, "web.shop.svc.cluster.local", tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AA
    assert records(response) == ["10.96.0.10"]
    assert response.answer[0].ttl == 30
    assert records(ask(port, "web.shop.svc.cluster.local", "AAAA", tcp=tcp), "AAAA") == ["fd00::10"]


@pytest.mark.parametrize("name", ["web", "web.shop", "web.shop.svc"])
def test_short_names_expand_in_the_clients_namespace(dnsenv, name):
    _, _, port = dnsenv
    response = ask(port, name)
    assert records(response) == ["10.96.0.10"]
    assert owners(response) == {f"{name}.": "A"}  # answered under the name asked, as ztunnel


def test_search_domains_strip_with_cname_and_append(dnsenv):
    _, _, port = dnsenv
    # the host resolver appended its own search domain to a mesh FQDN: stripped, answered with a CNAME
    response = ask(port, "web.shop.svc.cluster.local.corp.example")
    assert owners(response) == {"web.shop.svc.cluster.local.corp.example.": "CNAME",
                                "web.shop.svc.cluster.local.": "A"}
    assert records(response) == ["10.96.0.10"]
    # an unknown client (no namespace) still resolves a short name through the configured search domain
    assert records(ask(port, "web", source="127.0.0.2")) == ["10.96.0.10"]
    assert records(ask(port, "web-1", source="127.0.0.2")) == ["10.0.0.21"]


def test_workloads_headless_services_and_wildcards(dnsenv):
    _, _, port = dnsenv
    assert records(ask(port, "web-1")) == ["10.0.0.21"]
    assert records(ask(port, "web-1.shop.svc.cluster.local", "AAAA"), "AAAA") == ["fd00::21"]
    assert records(ask(port, "db.shop.svc.cluster.local")) == ["10.0.0.30"]  # headless: endpoint addresses
    assert records(ask(port, "api.wild.example.com")) == ["10.96.0.30"]
    assert records(ask(port, "external.example.com")) == ["10.96.0.20"]


def test_known_name_without_that_family_is_empty_noerror(dnsenv):
    harness, _, port = dnsenv
    response = ask(port, "external.example.com", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer and response.flags & dns.flags.AA
    assert ("udp", "external.example.com") not in harness.upstream.asked


def test_other_names_and_types_are_forwarded(dnsenv):
    harness, _, port = dnsenv
    response = ask(port, "example.org")
    assert records(response) == ["192.0.2.1"] and response.answer[0].ttl == 60
    assert records(ask(port, "web.shop.svc.cluster.local", "MX"), "MX") == ["10 mail.example.org."]
    # a service without VIPs outside svc.<domain> is not answered locally (ztunnel forwards it)
    assert records(ask(port, "novip.example.net")) == ["192.0.2.1"]
    assert ("udp", "novip.example.net") in harness.upstream.asked
    assert records(ask(port, "example.org", tcp=True)) == ["192.0.2.1"]
    assert ("tcp", "example.org") in harness.upstream.asked


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_upstream_errors_pass_through(dnsenv, tcp):
    _, _, port = dnsenv
    assert ask(port, "nx.example.org", tcp=tcp).rcode() == dns.rcode.NXDOMAIN
    assert ask(port, "fail.example.org", tcp=tcp).rcode() == dns.rcode.SERVFAIL


def test_truncated_upstream_answer_is_retried_over_tcp(dnsenv):
    harness, _, port = dnsenv
    # The client accepts 4096 bytes over UDP; the upstream truncates its UDP answer at 1232 (120 records
    # do not fit), so the proxy asks again over TCP and the whole answer fits the client's 4096.
    response = ask(port, "big.example.org", payload=4096)
    assert not response.flags & dns.flags.TC and len(records(response)) == 120
    assert ("tcp", "big.example.org") in harness.upstream.asked
    # A client without EDNS (512 bytes) gets TC, then the whole answer over TCP, as a stub resolver does.
    small = ask(port, "big.example.org")
    assert small.flags & dns.flags.TC and not small.answer
    assert len(records(ask(port, "big.example.org", tcp=True))) == 120


@pytest.mark.skipif(not shutil.which("dig"), reason="dig is not installed (apt: dnsutils)")
def test_dig_against_the_proxy(dnsenv):
    _, _, port = dnsenv

    def dig(*args: str) -> str:
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args],
                             capture_output=True, text=True, timeout=20)
        return out.stdout

    assert dig("+short", "web.shop.svc.cluster.local").split() == ["10.96.0.10"]
    assert dig("+short", "+tcp", "AAAA", "web.shop.svc.cluster.local").split() == ["fd00::10"]
    assert dig("+short", "example.org").split() == ["192.0.2.1"]
    assert "status: NXDOMAIN" in dig("nx.example.org")
    assert len(dig("+short", "+bufsize=4096", "big.example.org").split()) == 120


def test_no_upstream_answers_servfail_and_counts_failures():
    harness = Harness()
    try:
        # nothing listens on the discard port of loopback: every upstream attempt fails
        _, port = harness.start(upstreams=[("127.0.0.1", 9), ("127.0.0.1", 9)])
        response = ask(port, "example.org")
        assert response.rcode() == dns.rcode.SERVFAIL
        assert response.flags & dns.flags.QR
        assert _sample(harness.registry, "istio_dns_upstream_failures_total",
                       request_query_type="a", request_protocol="udp") == 1
    finally:
        harness.stop()


def test_malformed_query_gets_formerr(dnsenv):
    import socket

    _, _, port = dnsenv
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"\x12\x34garbage", ("127.0.0.1", port))
        data, _ = sock.recvfrom(512)
    response = dns.message.from_wire(data)
    assert response.id == 0x1234 and response.rcode() == dns.rcode.FORMERR


def _sample(registry, name: str, **labels: str) -> float:
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_dns_metrics(dnsenv):
    harness, _, port = dnsenv
    ask(port, "web.shop.svc.cluster.local")
    ask(port, "example.org")
    ask(port, "example.org", tcp=True)
    labels = {"source_canonical_service": "client-app", "source_canonical_revision": "v2"}
    assert _sample(harness.registry, "istio_dns_requests_total", request_query_type="a",
                   request_protocol="udp", **labels) == 2
    assert _sample(harness.registry, "istio_dns_upstream_requests_total", request_query_type="a",
                   request_protocol="udp", **labels) == 1
    assert _sample(harness.registry, "istio_dns_upstream_requests_total", request_query_type="a",
                   request_protocol="tcp", **labels) == 1
    assert _sample(harness.registry, "istio_dns_upstream_request_duration_seconds_count",
                   request_query_type="a", request_protocol="udp", **labels) == 1
    assert _sample(harness.registry, "istio_dns_upstream_failures_total") == 0
    text = generate_latest(harness.registry).decode()
    assert "_created" not in text


def test_reload_swaps_the_names(dnsenv):
    harness, proxy, port = dnsenv
    assert records(ask(port, "new.shop.svc.cluster.local")) == ["192.0.2.1"]  # forwarded: unknown yet
    changed = dict(MESH, services=MESH["services"] + [
        {"name": "new", "namespace": "shop", "hostname": "new.shop.svc.cluster.local",
         "vips": ["/10.96.0.99"], "ports": {80: 80}}])
    harness.loop.call_soon_threadsafe(proxy.update_state, parse_mesh_state(changed, "cluster.local"))
    harness.run(asyncio.sleep(0))
    assert records(ask(port, "new")) == ["10.96.0.99"]


def test_name_table_services_win_over_workloads():
    state = parse_mesh_state({
        "workloads": [{"uid": "w", "name": "web", "namespace": "shop", "workloadIps": ["10.0.0.5"]}],
        "services": [{"name": "web", "namespace": "shop", "hostname": "web.shop.svc.cluster.local",
                      "vips": ["/10.96.0.10"], "ports": {}}],
    }, "cluster.local")
    table = build_name_table(state)
    assert [r.addresses for r in table.hosts["web.shop.svc.cluster.local"]] == [("10.96.0.10",)]


def test_resolv_conf_and_systemd_resolved_fallback(tmp_path):
    stub = tmp_path / "resolv.conf"
    stub.write_text("# managed\nnameserver 127.0.0.53\noptions edns0\nsearch corp.example lab.\n")
    real = tmp_path / "resolved.conf"
    real.write_text("nameserver 192.0.2.53\nnameserver fe80::1%eth0\n")
    conf = read_resolv_conf(str(stub), str(real))
    assert conf.nameservers == (("192.0.2.53", 53), ("fe80::1", 53))
    assert conf.search == ("corp.example", "lab")
    plain = tmp_path / "plain.conf"
    plain.write_text("nameserver 192.0.2.1 ; comment\n")
    assert read_resolv_conf(str(plain), str(tmp_path / "absent")).nameservers == (("192.0.2.1", 53),)
    empty = tmp_path / "empty.conf"
    empty.write_text("search x\n")
    with pytest.raises(DnsConfigError, match="names no nameserver"):
        read_resolv_conf(str(empty), str(tmp_path / "absent"))


@pytest.mark.parametrize("text,expected", [
    ("192.0.2.1", ("192.0.2.1", 53)), ("192.0.2.1:5353", ("192.0.2.1", 5353)),
    ("[2001:db8::1]:53", ("2001:db8::1", 53)), ("2001:db8::1", ("2001:db8::1", 53)),
])
def test_parse_upstream(text, expected):
    assert parse_upstream(text) == expected


@pytest.mark.parametrize("text", ["dns.example", "192.0.2.1:0", "192.0.2.1:x"])
def test_parse_upstream_rejects(text):
    with pytest.raises(DnsConfigError, match="expected IP|port must be"):
        parse_upstream(text)
