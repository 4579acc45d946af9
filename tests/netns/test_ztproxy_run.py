"""The complete proxy through its real command line: two ``ztproxy run --config FILE`` processes in two
network namespaces, each with a settings file that uses every section, real certificates, a mesh state
with an ALLOW and a DENY policy, a deny list and a CRL.

    wA 10.1.0.2 -[wa0/a-w]- nA 10.1.0.1, 10.0.0.1 -[a-b/b-a]- nB 10.0.0.2, 10.2.0.1 -[b-w/wb0]- wB 10.2.0.2

wA is the workload ``frontend/web`` (node-a), wB the workload ``backend/api`` (node-b) with servers on
8080 and 9090; ``api.backend.svc.cluster.local`` has the VIP 10.96.0.10:80 -> 8080. REDIRECT rules send
wA's traffic to node-a's 15001 and HBONE/plaintext for 10.2.0.0/24 to node-b's 15008/15006. Every
ztproxy port is ztunnel's default (15000, 15001, 15006, 15008, 15020, 15021, 15053), each node in its own
namespace. Clients are independent of ztproxy: plain sockets, an h2+ssl HBONE client, dnspython, urllib,
and prometheus_client's parser for /metrics.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from pki import CA, Leaf
from prometheus_client.parser import text_string_to_metric_families
from proxy_harness import (
    EchoServer,
    H2TunnelClient,
    MeshFiles,
    client_tls_context,
    stop_process,
    workload,
    ztproxy_cmd,
    ztproxy_env,
)
from pyroute2 import netns as pyroute2_netns

pytestmark = pytest.mark.timeout(240)

WEB = "spiffe://cluster.local/ns/frontend/sa/web"
API = "spiffe://cluster.local/ns/backend/sa/api"
INTRUDER = "spiffe://cluster.local/ns/frontend/sa/intruder"
VIP = "10.96.0.10"
API_HOST = "api.backend.svc.cluster.local"
REQUEST = os.urandom(5000)
ANSWER = b"GOT " + hashlib.sha256(REQUEST).hexdigest().encode() + b"\n"  # EchoServer(after_eof=True)

POLICIES = [
    # Only the web service account may reach the backend namespace...
    {"name": "allow-web", "namespace": "backend", "scope": "Namespace", "action": "Allow",
     "rules": [[[{"principals": [{"Exact": "cluster.local/ns/frontend/sa/web"}]}]]]},
    # ...and nobody its port 9090, web included: a matching DENY wins over a matching ALLOW.
    {"name": "no-admin-port", "namespace": "backend", "scope": "Namespace", "action": "Deny",
     "rules": [[[{"destinationPorts": [9090]}]]]},
]


# ---------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in namespace ``name``: sockets created inside it belong to that namespace."""
    pyroute2_netns.pushns(name)
    try:
        yield
    finally:
        pyroute2_netns.popns()


def sh(*argv: str, netns: Optional[str] = None) -> None:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"


def http(netns: str, port: int, path: str, method: str = "GET", host: str = "127.0.0.1") -> Tuple[int, str]:
    with in_netns(netns):
        request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def metric(netns: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, scraped from :15020/metrics."""
    _, text = http(netns, 15020, "/metrics", host="127.0.0.1")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.1)


def exchange(netns: str, address: Tuple[str, int], payload: bytes) -> bytes:
    """Connect from ``netns``, send ``payload``, half-close, read until EOF (b"" on a reset)."""
    received = bytearray()
    try:
        # (a reset can already be there when connect() looks at the socket again)
        with in_netns(netns):
            sock = socket.create_connection(address, timeout=10)
    except ConnectionError:
        return b""
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received.extend(chunk)
    except OSError:  # reset (ECONNRESET, or ENOTCONN when the reset came before our shutdown)
        return b""
    finally:
        sock.close()
    return bytes(received)


def hbone_status(netns: str, leaf: Leaf, bundle: Path, tmp: Path, target: str) -> Optional[int]:
    """CONNECT ``target`` with an independent h2+ssl client from ``netns``; the :status, or None when the
    server closed the connection before answering (certificate refused after the handshake)."""
    ctx = client_tls_context(leaf, bundle, tmp)
    try:
        with in_netns(netns):
            client = H2TunnelClient(("10.2.0.2", 15008), ctx)
        try:
            sid = client.connect(target)
            status = client.wait_status(sid)
            if status == 200:  # finish the stream cleanly: half-close, read the server's answer to the end
                client.send(sid, b"", end_stream=True)
                client.wait(lambda: client.ended.get(sid))
            return status
        finally:
            client.close()
    except (AssertionError, OSError):
        return None


def access_lines(log: Path) -> List[Dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("scope") == "access":
                out.append(entry)
    return out


class DnsUpstream:
    """A real UDP nameserver (dnspython messages) on loopback in a namespace: answers outside.example."""

    def __init__(self, netns: str) -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.questions: List[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text()
            self.questions.append(name)
            response = dns.message.make_response(query)
            if name == "outside.example.":
                response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.77"))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


def crl_revoking(ca: CA, serial: int) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    revoked = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(now)
           .next_update(now + datetime.timedelta(days=1)).add_revoked_certificate(revoked)
           .sign(ca.key, hashes.SHA256()))
    return crl.public_bytes(Encoding.PEM)


def settings_file(files: MeshFiles, dns_upstream: int, revocation: Dict[str, Any]) -> Path:
    """A settings file with every key of every section, written as an operator would."""
    settings = {
        "node_name": files.node,
        "trust_domain": "cluster.local",
        "mesh_state": str(files.state_path),
        "certs_dir": str(files.certs_dir),
        "trust_bundle": str(files.bundle),
        "listen": {"outbound": "0.0.0.0:15001", "inbound": "0.0.0.0:15008",
                   "inbound_plaintext": "0.0.0.0:15006", "transparent": False, "dns": "0.0.0.0:15053",
                   "admin": "127.0.0.1:15000", "metrics": "0.0.0.0:15020", "readiness": "0.0.0.0:15021"},
        "hbone_port": 15008,
        "preserve_source": False,
        "socket_mark": 0x539,
        "connect_timeout": 5,
        "tls_handshake_timeout": 5,
        "endpoint_failure_cooldown": 30,
        "pool_max_streams": 100,
        "pool_idle_timeout": 300,
        "max_frame_size": 1 << 20,
        "stream_window": 4 << 20,
        "connection_window": 16 << 20,
        "drain_timeout": 5,
        "reload_interval": 0.2,
        "log_level": "info",
        "log_format": "json",
        "dns": {"upstreams": [f"127.0.0.1:{dns_upstream}"], "resolv_conf": "/etc/resolv.conf",
                "search_domains": [], "domain": "cluster.local"},
        "access_log": {"format": "json", "log_open": False},
        # No CA address: no online renewal here (test_identity_renewal covers it); the other keys still parse.
        "ca": {"addresses": [], "identity": None, "server_name": None, "token_file": None,
               "cert_ttl": 86400, "renew_fraction": 0.5},
        "revocation": revocation,
    }
    files.settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return files.settings_path


def mesh_state() -> Dict[str, Any]:
    return {
        "workloads": [
            workload("web", "10.1.0.2", "node-a", namespace="frontend"),
            workload("api", "10.2.0.2", "node-b", namespace="backend",
                     services={f"backend/{API_HOST}": {80: 8080}}),
        ],
        "services": [{"name": "api", "namespace": "backend", "hostname": API_HOST, "vips": [f"/{VIP}"],
                      "ports": {80: 8080}}],
        "policies": POLICIES,
    }


# ---------------------------------------------------------------------------------------------------
# Fixture: the topology, two real ztproxy processes


class Nodes:
    def __init__(self, ns: Dict[str, str], files: Dict[str, MeshFiles], procs: Dict[str, subprocess.Popen],
                 logs: Dict[str, Path], upstream: DnsUpstream, revoked: Dict[str, Leaf]) -> None:
        self.ns, self.files, self.procs, self.logs = ns, files, procs, logs
        self.upstream, self.revoked = upstream, revoked

    def log(self, node: str) -> str:
        return self.logs[node].read_text(errors="replace")


def _topology(make_netns) -> Dict[str, str]:
    ns = {name: make_netns(f"zw{name}") for name in ("wA", "nA", "nB", "wB")}
    sh("ip", "-n", ns["nA"], "link", "add", "a-w", "type", "veth", "peer", "name", "wa0", "netns", ns["wA"])
    sh("ip", "-n", ns["nA"], "link", "add", "a-b", "type", "veth", "peer", "name", "b-a", "netns", ns["nB"])
    sh("ip", "-n", ns["nB"], "link", "add", "b-w", "type", "veth", "peer", "name", "wb0", "netns", ns["wB"])
    for netns, dev, cidr in ((ns["wA"], "wa0", "10.1.0.2/24"), (ns["nA"], "a-w", "10.1.0.1/24"),
                             (ns["nA"], "a-b", "10.0.0.1/24"), (ns["nB"], "b-a", "10.0.0.2/24"),
                             (ns["nB"], "b-w", "10.2.0.1/24"), (ns["wB"], "wb0", "10.2.0.2/24")):
        sh("ip", "-n", netns, "addr", "add", cidr, "dev", dev)
        sh("ip", "-n", netns, "link", "set", dev, "up")
    sh("ip", "-n", ns["wA"], "route", "add", "default", "via", "10.1.0.1")
    sh("ip", "-n", ns["wB"], "route", "add", "default", "via", "10.2.0.1")
    sh("ip", "-n", ns["nA"], "route", "add", "10.2.0.0/24", "via", "10.0.0.2")
    sh("ip", "-n", ns["nB"], "route", "add", "10.1.0.0/24", "via", "10.0.0.1")
    # Capture (REDIRECT): everything web sends -> node-a's outbound; HBONE and plaintext for the backend
    # subnet -> node-b's inbound listeners.
    sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "a-w", "-p", "tcp", "-j", "REDIRECT",
       "--to-ports", "15001", netns=ns["nA"])
    sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "b-a", "-p", "tcp", "-d", "10.2.0.0/24", "--dport",
       "15008", "-j", "REDIRECT", "--to-ports", "15008", netns=ns["nB"])
    sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "b-a", "-p", "tcp", "-d", "10.2.0.0/24", "-j",
       "REDIRECT", "--to-ports", "15006", netns=ns["nB"])
    return ns


@pytest.fixture
def nodes(make_netns, tmp_path) -> Iterator[Nodes]:
    ns = _topology(make_netns)
    root = CA.root()
    files = {node: MeshFiles(tmp_path / node, node=node, root=root) for node in ("node-a", "node-b")}
    files["node-a"].install("frontend", "web")
    files["node-b"].install("backend", "api")
    upstream = DnsUpstream(ns["nB"])
    # Two certificates for the allowed identity, refused anyway: one by serial on the deny list, one by a
    # CRL of the intermediate that issued it.
    revoked = {"deny list": files["node-a"].issue("frontend", "web"),
               "crl": files["node-b"].issue("frontend", "web")}
    deny_list = tmp_path / "deny-list.yaml"
    deny_list.write_text(yaml.safe_dump({"serials": [format(revoked["deny list"].cert.serial_number, "x")]}))
    crl = tmp_path / "revoked.crl"
    crl.write_bytes(crl_revoking(files["node-b"].ca, revoked["crl"].cert.serial_number))
    procs, logs = {}, {}
    with in_netns(ns["wB"]):
        servers = [EchoServer("10.2.0.2", 8080, after_eof=True), EchoServer("10.2.0.2", 9090)]
    try:
        for node, netns in (("node-a", ns["nA"]), ("node-b", ns["nB"])):
            f = files[node]
            f.write_state(**mesh_state())
            # A CRL is accepted only from a CA the node knows (its roots, the intermediates of its own
            # chains): node-b's intermediate signed this one.
            crls = [str(crl)] if node == "node-b" else []
            path = settings_file(f, upstream.port, {"deny_list": str(deny_list), "crls": crls})
            logs[node] = tmp_path / f"{node}.log"
            with open(logs[node], "wb") as out:
                procs[node] = subprocess.Popen(["ip", "netns", "exec", netns, *ztproxy_cmd("run", "--config",
                                                                                          str(path))],
                                               stdout=out, stderr=subprocess.STDOUT, env=ztproxy_env())
        for node, netns in (("node-a", ns["nA"]), ("node-b", ns["nB"])):
            def ready(netns: str = netns, node: str = node) -> bool:
                assert procs[node].poll() is None, f"{node} exited:\n{logs[node].read_text()}"
                try:
                    return http(netns, 15021, "/healthz/ready", host="127.0.0.1")[0] == 200
                except OSError:
                    return False

            wait_for(ready, what=f"{node} readiness")
        yield Nodes(ns, files, procs, logs, upstream, revoked)
    finally:
        for proc in procs.values():
            stop_process(proc)
        for server in servers:
            server.close()
        upstream.close()


# ---------------------------------------------------------------------------------------------------
# The test


def test_the_real_cli_process_serves_policy_telemetry_dns_admin_and_drains(nodes: Nodes, tmp_path) -> None:
    ns = nodes.ns
    files_a, files_b = nodes.files["node-a"], nodes.files["node-b"]

    # (a) web -> service VIP: node-a balances to api, HBONE to node-b, the ALLOW policy admits it
    assert exchange(ns["wA"], (VIP, 80), REQUEST) == ANSWER
    # web -> api:9090: web matches the ALLOW policy, but the DENY policy wins; node-b answers 401, node-a
    # resets the client
    assert exchange(ns["wA"], ("10.2.0.2", 9090), b"let me in") == b""
    # another identity of the trust domain: 401 from node-b's HBONE server
    intruder = files_a.issue("frontend", "intruder")
    assert hbone_status(ns["nA"], intruder, files_a.bundle, tmp_path / "intruder", "10.2.0.2:8080") == 401
    # the allowed identity with a good certificate gets 200 from the same client code...
    good = files_a.issue("frontend", "web")
    assert hbone_status(ns["nA"], good, files_a.bundle, tmp_path / "good", "10.2.0.2:8080") == 200
    # ...but not with a certificate on the deny list or revoked by a CRL: closed before any answer
    for why, leaf in nodes.revoked.items():
        assert hbone_status(ns["nA"], leaf, files_a.bundle, tmp_path / why.replace(" ", "-"),
                            "10.2.0.2:8080") is None, why
    # plaintext (no identity) to api: the ALLOW policy requires web's identity, so the connection is reset
    assert exchange(ns["nA"], ("10.2.0.2", 8080), b"plaintext") == b""

    # (b) metrics, scraped from :15020 and parsed by prometheus_client
    web_to_api = {"source_principal": WEB, "destination_principal": API, "destination_workload": "api",
                  "destination_workload_namespace": "backend", "source_workload": "web",
                  "source_workload_namespace": "frontend", "connection_security_policy": "mutual_tls"}
    dst = dict(web_to_api, reporter="destination")
    wait_for(lambda: metric(ns["nB"], "istio_tcp_connections_closed_total", response_flags="-", **dst) == 1,
             what="node-b's close of web's connection")
    # destination side: web's connection through the VIP was proxied, the one to 9090 denied (the h2
    # client above runs in node-a's namespace, whose address is no workload: source_workload "unknown")
    assert metric(ns["nB"], "istio_tcp_connections_opened_total", **dst) == 2
    # ...bytes as Istio defines them: received = request (what web sent), sent = response
    assert metric(ns["nB"], "istio_tcp_received_bytes_total", **dst) == len(REQUEST)
    assert metric(ns["nB"], "istio_tcp_sent_bytes_total", **dst) == len(ANSWER)
    # each denial counted once, closed and failed with ztunnel's DENY flag
    assert metric(ns["nB"], "istio_tcp_connections_closed_total", response_flags="DENY", **dst) == 1
    assert metric(ns["nB"], "istio_tcp_connections_failed_total", response_flags="DENY", **dst) == 1
    assert metric(ns["nB"], "istio_tcp_connections_failed_total", response_flags="-", **dst) == 0
    assert metric(ns["nB"], "istio_tcp_connections_failed_total", source_principal=INTRUDER,
                  response_flags="DENY") == 1
    assert metric(ns["nB"], "istio_tcp_connections_failed_total", connection_security_policy="unknown",
                  response_flags="DENY") == 1
    assert metric(ns["nB"], "istio_tcp_connections_failed_total") == 3
    # source side (node-a): the same request/response semantics, and the service the client dialled
    src = dict(web_to_api, reporter="source", destination_service=API_HOST, destination_service_name="api",
               destination_service_namespace="backend")
    wait_for(lambda: metric(ns["nA"], "istio_tcp_connections_closed_total", **src) == 1, what="node-a close")
    assert metric(ns["nA"], "istio_tcp_connections_opened_total", **src) == 1
    assert metric(ns["nA"], "istio_tcp_received_bytes_total", **src) == len(REQUEST)
    assert metric(ns["nA"], "istio_tcp_sent_bytes_total", **src) == len(ANSWER)
    assert metric(ns["nA"], "istio_tcp_connections_failed_total", reporter="source") == 1  # the 9090 one
    assert metric(ns["nA"], "istio_build", component="ztproxy") == 1

    # (c) JSON access log lines name both SPIFFE identities; bytes from the reporting workload's side
    (b_line,) = [e for e in access_lines(nodes.logs["node-b"])
                 if e["message"] == "connection complete" and e.get("bytes_recv") == len(REQUEST)]
    assert (b_line["src.identity"], b_line["dst.identity"]) == (WEB, API)
    assert b_line["bytes_sent"] == len(ANSWER) and b_line["direction"] == "inbound"
    (a_line,) = [e for e in access_lines(nodes.logs["node-a"]) if e["message"] == "connection complete"]
    assert (a_line["src.identity"], a_line["dst.identity"]) == (WEB, API)
    # from web's side: it sent the request, received the answer
    assert a_line["bytes_sent"] == len(REQUEST) and a_line["bytes_recv"] == len(ANSWER)
    assert a_line["dst.service"] == API_HOST and a_line["direction"] == "outbound"
    denied = [e for e in access_lines(nodes.logs["node-b"]) if e["message"] == "connection failed"]
    assert sorted(e.get("src.identity") or "plaintext" for e in denied) == sorted([WEB, INTRUDER,
                                                                                   "plaintext"])
    assert any("denied by DENY policy backend/no-admin-port" in e["error"] for e in denied)
    log_b = nodes.log("node-b")
    assert "is on the deny list" in log_b and "is revoked by a CRL" in log_b

    # (e) DNS on 15053: a mesh name from the mesh state, authoritative; anything else forwarded upstream
    with in_netns(ns["nB"]):
        mesh = dns.query.udp(dns.message.make_query(API_HOST, "A"), "127.0.0.1", port=15053, timeout=5)
        over_tcp = dns.query.tcp(dns.message.make_query(API_HOST, "A"), "127.0.0.1", port=15053, timeout=5)
        outside = dns.query.udp(dns.message.make_query("outside.example", "A"), "127.0.0.1", port=15053,
                                timeout=5)
    for answer in (mesh, over_tcp):
        (rrset,) = answer.answer
        assert rrset.name.to_text() == API_HOST + "." and [r.address for r in rrset] == [VIP]
        assert answer.flags & dns.flags.AA
    assert outside.rcode() == dns.rcode.NOERROR and outside.answer[0][0].address == "192.0.2.77"
    assert nodes.upstream.questions == ["outside.example."]  # the mesh name never left the proxy
    assert metric(ns["nB"], "istio_dns_upstream_requests_total") == 1

    # (d) readiness, admin: config dump without private key material, then /quitquitquit drains
    assert http(ns["nB"], 15021, "/healthz/ready") == (200, "ready\n")
    status, body = http(ns["nB"], 15000, "/config_dump")
    dump = json.loads(body)
    assert status == 200 and dump["settings"]["listen"]["admin"] == "127.0.0.1:15000"
    assert dump["settings"]["revocation"]["crls"] and dump["policies"] == ["backend/allow-web",
                                                                           "backend/no-admin-port"]
    key_pem = (files_b.certs_dir / "backend" / "api" / "key.pem").read_text()
    key_body = "".join(key_pem.strip().splitlines()[1:-1])
    assert "PRIVATE KEY" not in body and key_body[:40] not in body.replace("\\n", "")
    with pytest.raises(OSError):  # admin is bound to loopback only
        http(ns["nB"], 15000, "/config_dump", host="10.2.0.1")
    assert http(ns["nB"], 15000, "/quitquitquit", "POST") == (200, "OK\n")
    assert nodes.procs["node-b"].wait(20) == 0, nodes.log("node-b")
    assert "stopped (clean drain)" in nodes.log("node-b")


def test_check_names_a_bad_policy_and_run_refuses_it(tmp_path) -> None:
    files = MeshFiles(tmp_path / "node", node="node-b")
    files.install("backend", "api")
    bad = dict(POLICIES[1], name="broken", action="Audit")
    files.write_state(**dict(mesh_state(), policies=[POLICIES[0], bad]))
    path = settings_file(files, 5353, {"deny_list": None, "crls": []})

    check = subprocess.run(ztproxy_cmd("check", "--config", str(path)), capture_output=True, text=True,
                           env=ztproxy_env(), timeout=60)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "policy backend/broken (policies[1]).action" in check.stderr and "Audit" in check.stderr

    run = subprocess.run(ztproxy_cmd("run", "--config", str(path)), capture_output=True, text=True,
                         env=ztproxy_env(), timeout=60)
    assert run.returncode == 1 and "policy backend/broken" in run.stderr, run.stderr

    files.write_state(**mesh_state())  # fixed: check passes and says what it found
    check = subprocess.run(ztproxy_cmd("check", "--config", str(path)), capture_output=True, text=True,
                           env=ztproxy_env(), timeout=60)
    assert check.returncode == 0, check.stderr
    assert "2 valid authorization policies" in check.stdout and check.stdout.strip().endswith("ok")
