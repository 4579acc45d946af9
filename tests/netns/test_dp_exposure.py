"""What ztproxy exposes off the node (issue 13, defect 8), on the role-built data plane with the real
`ztproxy run` in its proxy namespace and the listeners at their production defaults (everything on
0.0.0.0 in the proxy namespace except admin).

The attacker is the underlay host ``ext``, off the node. It may route anything through the node (it
sits on the node's network), so it also routes the proxy's private /30s via the node. From there it
tries every ztproxy port on every address: the node (a host workload), the contained workload, the
proxy's veth and tunnel addresses.

* DNS (15053): no answer, UDP or TCP, from any of them. Before the fix the proxy answered a 45-byte
  query with a 3.7 kB recursive answer (about 80 times amplification) from the proxy address.
  The node's own workloads still resolve through it.
* Nothing but HBONE (15008) and, for a workload's own ports, the plaintext path (15006: the connection
  is proxied to that workload port, under policy) is reachable: the admin, metrics, readiness and
  outbound listeners answer nothing from off the node.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dataplane"))
from dp_harness import PYTHON, Topology, run_role, sh  # noqa: E402
from pki import CA  # noqa: E402
from zp_harness import MeshFiles, stop_process, wait_for_log, workload, ztproxy_cmd, ztproxy_env  # noqa: E402

pytestmark = pytest.mark.timeout(600)
PROXY, TUN_IN, TUN_OUT = "192.168.125.2", "192.168.126.2", "192.168.127.2"
UPSTREAM = 5353  # the node's resolver (a stand-in on the node's address)


class Exposure:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.node = topo.nodes[0]
        self.targets = [self.node.ip, self.node.contained_ip, PROXY, TUN_IN, TUN_OUT]


@pytest.fixture(scope="module")
def exposed() -> Iterator[Exposure]:
    topo = Topology(f"dpx{os.getpid() % 100000}", nodes=1)
    proc = None
    try:
        node = topo.nodes[0]
        run_role(node)
        topo.start(node.ns, "bigdns.py", node.ip, str(UPSTREAM))
        # The attacker routes the proxy's private networks through the node, as any neighbour can.
        for net in ("192.168.125.0/30", "192.168.126.0/30", "192.168.127.0/30"):
            sh("ip", "route", "add", net, "via", node.ip, ns=topo.ext)
        files = MeshFiles(topo.workdir / "ztproxy", node="node-1", root=CA.root())
        files.install("hosts", "host1")
        files.install("apps", "c1")
        files.write_state([workload("host1", node.ip, "node-1", namespace="hosts"),
                           workload("c1", node.contained_ip, "node-1", namespace="apps")])
        files.write_settings(
            # Production values; admin, metrics and readiness are left at ztproxy's defaults.
            listen={"outbound": "0.0.0.0:15001", "inbound": "0.0.0.0:15008",
                    "inbound_plaintext": "0.0.0.0:15006", "transparent": True, "dns": "0.0.0.0:15053"},
            preserve_source=True, socket_mark=0x539, log_level="info",
            dns={"upstreams": [f"{node.ip}:{UPSTREAM}"]})
        log = topo.workdir / "ztproxy.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", node.proxy_ns]
                                    + ztproxy_cmd("run", "--config", str(files.settings_path)),
                                    stdout=out, stderr=subprocess.STDOUT, env=ztproxy_env())
        wait_for_log(proc, log, "ztproxy ready", timeout=30)
        yield Exposure(topo)
    finally:
        if proc is not None:
            stop_process(proc)
        topo.close()


_DNS_CLIENT = """
import socket, struct, sys
import dns.message, dns.query
ip, port, proto, source = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] or None
query = dns.message.make_query("amplify.example", "TXT", use_edns=0, payload=4096)
wire = query.to_wire()
try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        if source: s.bind((source, 0))
        s.connect((ip, port)); s.send(wire)
        answer = s.recv(65535)
    else:
        s = socket.create_connection((ip, port), timeout=2, source_address=(source, 0) if source else None)
        s.sendall(struct.pack("!H", len(wire)) + wire)
        head = s.recv(2)
        answer = b"" if len(head) < 2 else s.recv(65535)
    print(f"ANSWER {len(wire)} {len(answer)}" if answer else "CLOSED")
except socket.timeout:
    print("TIMEOUT")
except OSError as exc:
    print(f"ERROR {exc.__class__.__name__}")
"""

_HTTP_CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    s.sendall(b"GET " + sys.argv[3].encode() + b" HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = s.recv(4096)
    print("HTTP " + data.split(b"\\r\\n")[0].decode(errors="replace") if data else "CLOSED")
except socket.timeout:
    print("TIMEOUT")
except OSError as exc:
    print(f"ERROR {exc.__class__.__name__}")
"""


_CONNECT = """
import socket, sys
s = socket.socket(); s.settimeout(2)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.settimeout(1)
    try:
        print("CONNECTED, then " + ("data" if s.recv(100) else "closed"))
    except socket.timeout:
        print("CONNECTED, open")
    except OSError as exc:
        print(f"CONNECTED, then {exc.__class__.__name__}")
except OSError:
    print("NO")
"""


def ask_dns(ns: str, ip: str, proto: str, source: str = "", port: int = 15053) -> str:
    return sh(PYTHON, "-c", _DNS_CLIENT, ip, str(port), proto, source, ns=ns, timeout=30).stdout.strip()


def http(ns: str, ip: str, port: int, path: str) -> str:
    return sh(PYTHON, "-c", _HTTP_CLIENT, ip, str(port), path, ns=ns, timeout=30).stdout.strip()


def test_the_dns_proxy_answers_no_one_off_the_node(exposed: Exposure) -> None:
    results: Dict[Tuple[str, str], str] = {}
    for ip in exposed.targets:
        for proto in ("udp", "tcp"):
            results[(ip, proto)] = ask_dns(exposed.topo.ext, ip, proto)
    answered = {k: v for k, v in results.items() if v.startswith("ANSWER")}
    amplification = {k: int(v.split()[2]) / int(v.split()[1]) for k, v in answered.items()}
    assert not answered, f"answered off the node: {answered} (amplification {amplification})"


def test_the_nodes_own_workloads_still_resolve(exposed: Exposure) -> None:
    node = exposed.node
    # A contained workload (routed to the proxy by its node) and a host workload (its own address).
    assert ask_dns(node.contained_ns, PROXY, "udp").startswith("ANSWER"), "contained workload, UDP"
    assert ask_dns(node.contained_ns, PROXY, "tcp").startswith("ANSWER"), "contained workload, TCP"
    assert ask_dns(node.ns, PROXY, "udp", source=node.ip).startswith("ANSWER"), "host workload"
    # The node talking from an address that is no workload's is not served either.
    assert not ask_dns(node.ns, PROXY, "udp").startswith("ANSWER")


def test_no_listener_but_hbone_is_reachable_from_off_the_node(exposed: Exposure) -> None:
    reached: List[str] = []
    for ip in exposed.targets:
        for port, path in ((15000, "/config_dump"), (15020, "/metrics"), (15021, "/healthz/ready")):
            answer = http(exposed.topo.ext, ip, port, path)
            if answer.startswith("HTTP") and ("200" in answer or "503" in answer):
                reached.append(f"{ip}:{port} {answer}")
    # The data-plane listeners at the proxy's own addresses: a completed TCP handshake is "reachable".
    for ip in (PROXY, TUN_IN, TUN_OUT):
        for port in (15001, 15006):
            answer = sh(PYTHON, "-c", _CONNECT, ip, str(port), ns=exposed.topo.ext, timeout=30).stdout.strip()
            if answer != "NO":
                reached.append(f"{ip}:{port} {answer}")
    assert not reached, "reachable from off the node: " + "; ".join(reached)
