"""The DNS proxy (ztproxy/dns.py) against generated queries: arbitrary bytes and mutations of valid
queries (any name, type, class, opcode, flags, EDNS size), from a client of this node (loopback) and
from a stranger, through the proxy's real query handler with a real upstream on loopback.

A stranger never gets an answer; a client gets an answer or nothing (a message with no header), never
an exception and never an answer larger than its UDP size. Afterwards the proxy still answers a normal
query over a real UDP socket, and memory stayed bounded."""

from __future__ import annotations

import asyncio

import dns.asyncquery
import dns.flags
import dns.message
import pytest
from conftest import EXAMPLES, Replay
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from ztproxy.dns import DnsMetrics, DnsProxy
from ztproxy.state import parse_mesh_state

MESH = {
    "workloads": [{"name": "web", "namespace": "shop", "workloadIps": ["127.0.0.1"], "node": "node-a"},
                  {"name": "db", "namespace": "shop", "workloadIps": ["10.0.0.2"], "node": "node-b"}],
    "services": [{"name": "web", "namespace": "shop", "hostname": "web.shop.svc.cluster.local",
                  "vips": ["/10.96.0.10"], "ports": {80: 8080}}],
}
NAMES = ["web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local", "db.shop.svc.cluster.local",
         "outside.example", "*.x", "", "a" * 63, "é.example"]


class _Upstream(asyncio.DatagramProtocol):
    """The node's resolver: answers every query it can parse with one A record."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            self.transport.sendto(response.to_wire(), addr)
        except Exception:  # noqa: BLE001 -- a stand-in resolver, not what is tested
            pass


class Fixture:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        transport, _ = self.loop.run_until_complete(
            self.loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", 0)))
        self.upstream = transport
        port = transport.get_extra_info("sockname")[1]
        self.proxy = DnsProxy([("127.0.0.1", port)], DnsMetrics(CollectorRegistry()),
                              state=parse_mesh_state(MESH, "cluster.local"), timeout=0.5, node="node-a")
        ((_, self.port),) = self.loop.run_until_complete(self.proxy.start([("127.0.0.1", 0)]))

    def handle(self, wire: bytes, client: str, protocol: str):
        return self.loop.run_until_complete(self.proxy.handle(wire, client, protocol))

    def close(self) -> None:
        self.loop.run_until_complete(self.proxy.close())
        self.upstream.close()
        self.loop.close()


@pytest.fixture(scope="module")
def proxy():
    fixture = Fixture()
    yield fixture
    fixture.close()


@st.composite
def queries(draw) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=300))
    query = dns.message.make_query(draw(st.sampled_from(NAMES)) or ".",
                                   draw(st.sampled_from([1, 28, 5, 16, 255, 0, 65535, 33])),
                                   use_edns=draw(st.sampled_from([False, 0])),
                                   payload=draw(st.integers(0, 65535)))
    query.flags = draw(st.integers(0, 0xFFFF)) & ~dns.flags.QR if draw(st.booleans()) else query.flags
    wire = bytearray(query.to_wire())
    for _ in range(draw(st.integers(0, 3))):  # flip bytes anywhere, header included
        if wire:
            wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
    return bytes(wire) + draw(st.binary(max_size=8))


def _query(proxy: Fixture, wire: bytes, protocol: str) -> None:
    assert proxy.handle(wire, "203.0.113.5", protocol) is None  # a stranger: nothing at all
    answer = proxy.handle(wire, "127.0.0.1", protocol)
    if answer is not None:
        assert isinstance(answer, bytes) and len(answer) >= 2
        if protocol == "udp":
            assert len(answer) <= 65535


@pytest.mark.timeout(3600)
def test_generated_queries(proxy: Fixture) -> None:
    inputs = []
    replay = Replay(limit=20000)

    @given(wire=queries(), protocol=st.sampled_from(["udp", "tcp"]))
    def one(wire: bytes, protocol: str) -> None:
        inputs.append(len(wire))
        replay.add(wire, protocol)
        _query(proxy, wire, protocol)

    one()
    assert len(inputs) >= EXAMPLES, f"only {len(inputs)} inputs were generated"
    # A normal query over a real UDP socket to the proxy's listener (served by the same loop).
    query = dns.message.make_query("web.shop.svc.cluster.local", "A")
    response = proxy.loop.run_until_complete(
        dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=5))
    assert [r.to_text() for rrset in response.answer for r in rrset] == ["10.96.0.10"]
    grown, replayed = replay.growth(lambda wire, protocol: _query(proxy, wire, protocol))
    assert grown < 100 * 2**20, f"memory grew by {grown / 2**20:.0f} MiB over {replayed} replayed queries"
