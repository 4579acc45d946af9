"""The packet walks of docs/dataplane.md with real packets: two simulated nodes (network namespaces) built by
roles/ztmesh_node through ansible-playbook, a transparent stand-in for ztproxy in each proxy namespace
(tests/dataplane/relay.py: IP_TRANSPARENT listeners on 15001/15006/15008, as ztproxy has), and real
servers in the nodes, the contained workloads and an outside host.
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dataplane"))
from dp_harness import EXT_IP, Topology, ping, relay_log, run_role, sh, tcp, udp  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Topology]:
    topo = Topology(f"dpw{os.getpid() % 100000}")
    try:
        n1 = topo.nodes[0]
        # node1 is firewalled like a ufw/Docker host: forwarding dropped unless accepted.
        sh("iptables", "-P", "FORWARD", "DROP", ns=n1.ns)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(run_role, topo.nodes))
        for node in topo.nodes:
            topo.start(node.ns, "server.py", "--name", f"host{node.index}", "--tcp", "22", "53", "8080",
                       "--udp", "53", "5353")
            topo.start(node.contained_ns, "server.py", "--name", f"c{node.index}", "--tcp", "22", "8080")
        topo.start(topo.ext, "server.py", "--name", "ext", "--tcp", "53", "8080", "--udp", "53", "5353")
        yield topo
    finally:
        topo.close()


def start_relays(topo: Topology, mode: str) -> dict:
    relays = {}
    for node in topo.nodes:
        log = topo.workdir / f"relay-{mode}-{node.index}.jsonl"
        args = ["--mode", mode, "--log", str(log), "--own", node.ip,
                "--mesh", "10.123.0.1/32", "10.123.0.2/32", "10.124.0.0/16"]
        relays[node.index] = (topo.start(node.proxy_ns, "relay.py", *args), log)
    return relays


def stop_relays(topo: Topology, relays: dict) -> None:
    for proc, _log in relays.values():
        topo.stop(proc)


def captured(answer: str, port: int, src_ip: str, dst: str) -> bool:
    """A banner of the relay: '<port> <src ip:port> <dst ip:port>'."""
    return re.fullmatch(rf"{port} {re.escape(src_ip)}:\d+ {re.escape(dst)}", answer) is not None


@pytest.fixture(scope="module")
def banners(mesh: Topology) -> Iterator[dict]:
    relays = start_relays(mesh, "banner")
    yield relays
    stop_relays(mesh, relays)


def test_outbound_from_host_workload_is_captured_with_its_original_destination(mesh, banners):
    n1, n2 = mesh.nodes
    answer = tcp(n1.ns, n2.ip, 8080)
    assert captured(answer, 15001, n1.ip, f"{n2.ip}:8080"), answer
    assert any(r["port"] == 15001 and r["dst"] == f"{n2.ip}:8080" for r in relay_log(banners[1][1]))
    # passthrough destination (outside the mesh) is captured the same way: the proxy decides
    assert captured(tcp(n1.ns, EXT_IP, 8080), 15001, n1.ip, f"{EXT_IP}:8080")


def test_outbound_from_contained_workload_is_captured(mesh, banners):
    n1, n2 = mesh.nodes
    assert captured(tcp(n1.contained_ns, EXT_IP, 8080), 15001, n1.contained_ip, f"{EXT_IP}:8080")
    assert captured(tcp(n1.contained_ns, n2.contained_ip, 8080), 15001, n1.contained_ip,
                    f"{n2.contained_ip}:8080")


def test_hbone_from_a_peer_proxy_reaches_15008_snatted_to_the_peer_node(mesh, banners):
    n1, n2 = mesh.nodes
    # Sent from node2's proxy namespace (its private address): SNAT to node2's address on the way out.
    answer = tcp(n2.proxy_ns, n1.ip, 15008)
    assert captured(answer, 15008, n2.ip, f"{n1.ip}:15008"), answer
    answer = tcp(n2.proxy_ns, n1.contained_ip, 15008)
    assert captured(answer, 15008, n2.ip, f"{n1.contained_ip}:15008"), answer


def test_plaintext_from_outside_the_mesh_reaches_15006(mesh, banners):
    n1 = mesh.nodes[0]
    assert captured(tcp(mesh.ext, n1.ip, 8080), 15006, EXT_IP, f"{n1.ip}:8080")
    assert captured(tcp(mesh.ext, n1.contained_ip, 8080), 15006, EXT_IP, f"{n1.contained_ip}:8080")


def test_ssh_is_never_captured(mesh, banners):
    n1, n2 = mesh.nodes
    assert tcp(mesh.ext, n1.ip, 22).startswith(f"host1 peer={EXT_IP}:")
    # node2's contained workload: node1 drops uncaptured forwarding by its own policy, as it should
    assert tcp(mesh.ext, n2.contained_ip, 22).startswith(f"c2 peer={EXT_IP}:")
    # outbound SSH of a host workload to another node, and inbound there: both excluded
    assert tcp(n1.ns, n2.ip, 22).startswith(f"host2 peer={n1.ip}:")


def test_udp_dns_and_the_node_talking_to_itself_pass_uncaptured(mesh, banners):
    n1, n2 = mesh.nodes
    assert udp(mesh.ext, n1.ip, 5353).startswith(f"host1 peer={EXT_IP}:")
    assert udp(n1.ns, EXT_IP, 5353).startswith(f"ext peer={n1.ip}:")
    assert udp(n2.contained_ns, EXT_IP, 53).startswith(f"ext peer={n2.contained_ip}:")
    assert tcp(n1.ns, EXT_IP, 53).startswith(f"ext peer={n1.ip}:")  # DNS over TCP: excluded
    assert tcp(n1.ns, n1.ip, 8080).startswith(f"host1 peer={n1.ip}:")
    assert ping(mesh.ext, n2.contained_ip) == f"REPLY {n2.contained_ip}"  # ICMP passes too


def test_proxy_down_fails_closed_while_ssh_dns_and_udp_keep_working(mesh, banners):
    n1, n2 = mesh.nodes
    proc, _log = banners[1]
    mesh.stop(proc)
    try:
        assert tcp(n1.ns, n2.ip, 8080, timeout=2) == "TIMEOUT"
        assert tcp(n1.contained_ns, EXT_IP, 8080, timeout=2) == "TIMEOUT"
        assert tcp(mesh.ext, n1.ip, 8080, timeout=2) == "TIMEOUT"
        assert tcp(mesh.ext, n1.ip, 22).startswith(f"host1 peer={EXT_IP}:")
        assert udp(n1.ns, EXT_IP, 53).startswith(f"ext peer={n1.ip}:")
        assert tcp(n1.ns, EXT_IP, 53).startswith(f"ext peer={n1.ip}:")
        # node1's uncaptured forwarding is dropped by its own FORWARD policy (test set-up), not by ztmesh
    finally:
        banners[1] = (mesh.start(n1.proxy_ns, "relay.py", "--mode", "banner", "--log",
                                 str(banners[1][1]), "--own", n1.ip), banners[1][1])


@pytest.fixture(scope="module")
def relays(mesh: Topology, banners) -> Iterator[dict]:
    stop_relays(mesh, banners)
    started = start_relays(mesh, "relay")
    yield started
    stop_relays(mesh, started)
    banners.clear()


@pytest.mark.parametrize("walk", [
    "contained->contained", "host->host", "outside->host", "outside->contained",
    "contained->outside", "host->outside",
])
def test_end_to_end_through_both_proxies_keeps_the_client_address(mesh, relays, walk):
    """Full round trips: capture, (plaintext) HBONE between the proxies, delivery, and every reply path."""
    n1, n2 = mesh.nodes
    client, server = walk.split("->")
    src_ns, src_ip = {"contained": (n1.contained_ns, n1.contained_ip), "host": (n1.ns, n1.ip),
                      "outside": (mesh.ext, EXT_IP)}[client]
    if client == "outside":
        dst_ip, name = {"host": (n1.ip, "host1"), "contained": (n1.contained_ip, "c1")}[server]
    elif server == "outside":
        dst_ip, name = EXT_IP, "ext"
    else:
        dst_ip, name = {"host": (n2.ip, "host2"), "contained": (n2.contained_ip, "c2")}[server]
    answer = tcp(src_ns, dst_ip, 8080)
    assert answer.startswith(f"{name} peer={src_ip}:"), answer
    ports = {r["port"] for _proc, log in relays.values() for r in relay_log(log)
             if r.get("target") == f"{dst_ip}:8080" and not r.get("error")}
    expected = {15006} if client == "outside" else ({15001} if server == "outside" else {15001, 15008})
    assert expected <= ports, (walk, ports)


def test_dns_capture_switches_with_the_proxy(mesh):
    """ztmesh_dns_capture: DNS goes to the proxy's 15053 only between 'dns-capture on' and 'off' (the
    proxy service's start/stop hooks), and straight to its server otherwise."""
    n1 = mesh.nodes[0]
    changed = run_role(n1, extra={"ztmesh_dns_capture": True})["changed_tasks"]
    assert changed, "turning DNS capture on must change the chains"
    script = [str(n1.dp_dir / "ztmesh-dataplane"), "dns-capture"]
    assert udp(n1.ns, EXT_IP, 53).startswith(f"ext peer={n1.ip}:"), "captured before the proxy runs"
    stub = mesh.start(n1.proxy_ns, "dnsstub.py", "15053")
    try:
        assert sh(*script, "on").returncode == 0
        # The answer reaches the client's connected socket: it came back as from EXT_IP:53.
        assert udp(n1.ns, EXT_IP, 53) == "proxy-dns"
        assert udp(n1.contained_ns, EXT_IP, 53) == "proxy-dns"
    finally:
        mesh.stop(stub)
    assert sh(*script, "off").returncode == 0
    assert udp(n1.ns, EXT_IP, 53).startswith(f"ext peer={n1.ip}:")
    # A switch left on (proxy killed without its stop hook) goes away when capture is turned off.
    stub = mesh.start(n1.proxy_ns, "dnsstub.py", "15053")
    assert sh(*script, "on").returncode == 0
    mesh.stop(stub)
    assert "104:" in sh("ip", "rule", ns=n1.ns).stdout
    run_role(n1)
    assert "104:" not in sh("ip", "rule", ns=n1.ns).stdout
    assert udp(n1.ns, EXT_IP, 53).startswith(f"ext peer={n1.ip}:")
