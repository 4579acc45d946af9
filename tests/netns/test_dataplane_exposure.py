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

With the operator's switch on (``ztmesh_proxy_expose: [metrics]``, ``ztmesh_proxy_expose_cidrs`` the
attacker's /32), on a second node built by the role with it: metrics answer at the node's address to
that source, and to nobody else; readiness, admin, DNS, the proxy's private addresses (metrics
included, when routed to directly) stay unreachable. The exposure is idempotent and the uninstall
removes it with the rest of the data plane.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dataplane"))
from dp_harness import EXT_IP, PYTHON, Topology, run_role, sh, snapshot  # noqa: E402
from pki import CA  # noqa: E402
from proxy_harness import MeshFiles, stop_process, wait_for_log, workload, ztproxy_cmd, ztproxy_env  # noqa: E402

pytestmark = pytest.mark.timeout(600)
PROXY, TUN_IN, TUN_OUT = "192.168.125.2", "192.168.126.2", "192.168.127.2"
UPSTREAM = 5353  # the node's resolver (a stand-in on the node's address)
EXT_OTHER = "10.123.0.10"  # a second address of the off-node host, outside ztmesh_proxy_expose_cidrs


class Exposure:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.node = topo.nodes[0]
        self.targets = [self.node.ip, self.node.contained_ip, PROXY, TUN_IN, TUN_OUT]
        self.proc: Optional[subprocess.Popen] = None
        self.before: Dict[str, Any] = {}


@contextlib.contextmanager
def _built_node(prefix: str, role_vars: Dict[str, Any], listen: Dict[str, str]) -> Iterator[Exposure]:
    """One node built by the role with ``role_vars``, ztproxy running in its proxy namespace with the
    production listeners plus ``listen``, and the off-node attacker routing the proxy's /30s via it."""
    topo = Topology(f"{prefix}{os.getpid() % 100000}", nodes=1)
    exposure = Exposure(topo)
    try:
        node = topo.nodes[0]
        node.extra_vars.update(role_vars)
        exposure.before = snapshot(node.ns)
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
            # Production values; admin, metrics and readiness are at ztproxy's defaults unless given.
            listen={"outbound": "0.0.0.0:15001", "inbound": "0.0.0.0:15008",
                    "inbound_plaintext": "0.0.0.0:15006", "transparent": True, "dns": "0.0.0.0:15053",
                    **listen},
            preserve_source=True, socket_mark=0x539, log_level="info",
            dns={"upstreams": [f"{node.ip}:{UPSTREAM}"]})
        log = topo.workdir / "ztproxy.log"
        with open(log, "w") as out:
            exposure.proc = subprocess.Popen(["ip", "netns", "exec", node.proxy_ns]
                                             + ztproxy_cmd("run", "--config", str(files.settings_path)),
                                             stdout=out, stderr=subprocess.STDOUT, env=ztproxy_env())
        wait_for_log(exposure.proc, log, "ztproxy ready", timeout=30)
        yield exposure
    finally:
        if exposure.proc is not None:
            stop_process(exposure.proc)
        topo.close()


@pytest.fixture(scope="module")
def exposed() -> Iterator[Exposure]:
    with _built_node("dpx", {}, {}) as exposure:
        yield exposure


@pytest.fixture(scope="module")
def metrics_exposed() -> Iterator[Exposure]:
    switch = {"ztmesh_proxy_expose": ["metrics"], "ztmesh_proxy_expose_cidrs": [f"{EXT_IP}/32"]}
    # The listen address the ztproxy role writes for an exposed listener (roles/ztproxy/tasks/install.yml).
    with _built_node("dpm", switch, {"metrics": "0.0.0.0:15020"}) as exposure:
        sh("ip", "addr", "add", f"{EXT_OTHER}/24", "dev", "eth0", ns=exposure.topo.ext)
        yield exposure


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
    source = (sys.argv[4], 0) if len(sys.argv) > 4 else None
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2, source_address=source)
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


def http(ns: str, ip: str, port: int, path: str, source: str = "") -> str:
    return sh(PYTHON, "-c", _HTTP_CLIENT, ip, str(port), path, *([source] if source else []), ns=ns,
              timeout=30).stdout.strip()


def answered(reply: str) -> bool:
    """An HTTP answer of the listener itself (200 or, for readiness, 503)."""
    return reply.startswith("HTTP") and ("200" in reply or "503" in reply)


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


def _reachable_from_off_the_node(exposure: Exposure, skip: Tuple[Tuple[str, int], ...] = ()) -> List[str]:
    """Every proxy listener that answers the off-node attacker, on every address of the node, except
    the (address, port) pairs in ``skip``."""
    reached: List[str] = []
    for ip in exposure.targets:
        for port, path in ((15000, "/config_dump"), (15020, "/metrics"), (15021, "/healthz/ready")):
            if (ip, port) in skip:
                continue
            answer = http(exposure.topo.ext, ip, port, path)
            if answered(answer):
                reached.append(f"{ip}:{port} {answer}")
    # The data-plane listeners at the proxy's own addresses: a completed TCP handshake is "reachable".
    for ip in (PROXY, TUN_IN, TUN_OUT):
        for port in (15001, 15006):
            probe = sh(PYTHON, "-c", _CONNECT, ip, str(port), ns=exposure.topo.ext, timeout=30)
            answer = probe.stdout.strip()
            if answer != "NO":
                reached.append(f"{ip}:{port} {answer}")
    return reached


def test_no_listener_but_hbone_is_reachable_from_off_the_node(exposed: Exposure) -> None:
    reached = _reachable_from_off_the_node(exposed)
    assert not reached, "reachable from off the node: " + "; ".join(reached)


def test_the_expose_switch_makes_metrics_reachable_to_the_chosen_sources_only(
        metrics_exposed: Exposure) -> None:
    exposure, node = metrics_exposed, metrics_exposed.node
    # The role applied with the switch on is idempotent (the exposure rules are in canonical form).
    assert run_role(node)["stats"]["changed"] == 0
    metrics = http(exposure.topo.ext, node.ip, 15020, "/metrics")
    assert metrics.startswith("HTTP") and "200" in metrics, metrics
    # Not to another source off the node (ztmesh_proxy_expose_cidrs)...
    assert not answered(http(exposure.topo.ext, node.ip, 15020, "/metrics", source=EXT_OTHER))
    # ...and nothing else answers anyone off the node: readiness and admin at every address, metrics at
    # the proxy's private addresses routed to directly, the data-plane listeners there, DNS.
    reached = _reachable_from_off_the_node(exposure, skip=((node.ip, 15020),))
    assert not reached, "reachable from off the node: " + "; ".join(reached)
    dns = [f"{ip}/{proto}" for ip in exposure.targets for proto in ("udp", "tcp")
           if ask_dns(exposure.topo.ext, ip, proto).startswith("ANSWER")]
    assert not dns, f"DNS answered off the node: {dns}"


def test_uninstall_removes_the_exposure(metrics_exposed: Exposure) -> None:
    exposure, node = metrics_exposed, metrics_exposed.node
    stop_process(exposure.proc)
    exposure.proc = None
    run_role(node, action="uninstall")
    after = snapshot(node.ns)
    for kind in exposure.before:
        assert after[kind] == exposure.before[kind], kind
    assert not answered(http(exposure.topo.ext, node.ip, 15020, "/metrics"))
