"""Two nodes in network namespaces, real iptables capture (TPROXY and REDIRECT), ztproxy on each as a
subprocess (``ztproxy run`` under ``ip netns exec``), unmodified clients and servers in workload
namespaces behind each node.

    wA 10.1.0.2 -[wa0/a-w]- nA 10.1.0.1, 10.0.0.1 -[a-b/b-a]- nB 10.0.0.2, 10.2.0.1 -[b-w/wb0]- wB 10.2.0.2

Node A captures everything its workload sends (outbound, 15001); node B captures HBONE to its workload
(15008) and plaintext to it (15006). The capture rules are the minimum for the test; the full node data
plane is built by the Ansible modules.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest
from pki import CA
from proxy_harness import MeshFiles, stop_process, wait_for_log, workload, ztproxy_cmd, ztproxy_env

SIZE = int(os.environ.get("ZP_TRANSFER_BYTES", 1 << 30))  # 1 GiB; smaller for quick local runs
MARKER = "ZTMESH-PLAINTEXT-MARKER-7f3a9c"
SERVICE_VIP = "10.96.0.10"

pytestmark = pytest.mark.timeout(300)


def sh(*argv: str, netns: str = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


def _topology(make_netns) -> Dict[str, str]:
    ns = {name: make_netns(f"zp{name}") for name in ("wA", "nA", "nB", "wB")}
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
    for node in (ns["nA"], ns["nB"]):
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=node)
        # Packets for the proxy's transparent sockets (TPROXY'd connections and connections it opened
        # with the client's address) are delivered locally.
        sh("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket", "--transparent",
           "-j", "MARK", "--set-mark", "0x400/0xfff", netns=node)
        sh("ip", "rule", "add", "fwmark", "0x400/0xfff", "lookup", "100", netns=node)
        sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100", netns=node)
    return ns


def _capture(ns: Dict[str, str], mode: str) -> None:
    if mode == "tproxy":
        tp = ["-j", "TPROXY", "--tproxy-mark", "0x400/0xfff", "--on-port"]
        sh("iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "a-w", "-p", "tcp", *tp, "15001",
           netns=ns["nA"])
        sh("iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "b-a", "-p", "tcp", "-d", "10.2.0.0/24",
           "--dport", "15008", *tp, "15008", netns=ns["nB"])
        sh("iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "b-a", "-p", "tcp", "-d", "10.2.0.0/24",
           *tp, "15006", netns=ns["nB"])
    else:
        sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "a-w", "-p", "tcp", "-j", "REDIRECT",
           "--to-ports", "15001", netns=ns["nA"])
        sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "b-a", "-p", "tcp", "-d", "10.2.0.0/24",
           "--dport", "15008", "-j", "REDIRECT", "--to-ports", "15008", netns=ns["nB"])
        sh("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "b-a", "-p", "tcp", "-d", "10.2.0.0/24",
           "-j", "REDIRECT", "--to-ports", "15006", netns=ns["nB"])


class Mesh:
    def __init__(self, ns: Dict[str, str], tmp: Path, procs: Dict[str, subprocess.Popen],
                 logs: Dict[str, Path], files: Dict[str, MeshFiles]) -> None:
        self.ns, self.tmp, self.procs, self.logs, self.files = ns, tmp, procs, logs, files

    def log(self, node: str) -> str:
        return self.logs[node].read_text(errors="replace")

    def sh(self, *argv: str, netns: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """sh() whose failure message carries both proxies' logs."""
        try:
            return sh(*argv, netns=netns, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- node-a ---\n{self.log('node-a')}\n--- node-b ---\n"
                                 f"{self.log('node-b')}") from None


def _mesh_state() -> Dict:
    return {
        "workloads": [
            workload("web", "10.1.0.2", "node-a", namespace="frontend"),
            workload("api", "10.2.0.2", "node-b", namespace="backend",
                     services={"backend/api.backend.svc.cluster.local": {80: 8080}}),
        ],
        "services": [{"name": "api", "namespace": "backend", "hostname": "api.backend.svc.cluster.local",
                      "vips": [f"/{SERVICE_VIP}"], "ports": {80: 8080}}],
    }


@pytest.fixture(params=["tproxy", "redirect"])
def mesh(request, make_netns, tmp_path) -> Iterator[Mesh]:
    ns = _topology(make_netns)
    _capture(ns, request.param)
    root = CA.root()
    state = _mesh_state()
    files, procs, logs = {}, {}, {}
    for node, netns, (namespace, sa) in (("node-a", ns["nA"], ("frontend", "web")),
                                         ("node-b", ns["nB"], ("backend", "api"))):
        f = MeshFiles(tmp_path / node, node=node, root=root)
        f.install(namespace, sa)
        f.write_state(state["workloads"], state["services"])
        f.write_settings(listen={"outbound": "0.0.0.0:15001", "inbound": "0.0.0.0:15008",
                                 "inbound_plaintext": "0.0.0.0:15006", "transparent": True},
                         preserve_source=True, socket_mark=0x539,
                         log_level=os.environ.get("ZP_LOG_LEVEL", "info"))
        logs[node] = tmp_path / f"{node}.log"
        with open(logs[node], "w") as out:
            procs[node] = subprocess.Popen(["ip", "netns", "exec", netns] +
                                           ztproxy_cmd("run", "--config", str(f.settings_path)),
                                           stdout=out, stderr=subprocess.STDOUT, env=ztproxy_env())
        files[node] = f
    try:
        for node in procs:
            wait_for_log(procs[node], logs[node], "ztproxy ready")
        yield Mesh(ns, tmp_path, procs, logs, files)
    finally:
        for proc in procs.values():
            stop_process(proc)


def _http_server(mesh: Mesh, netns: str, bind: str, port: int, name: str) -> subprocess.Popen:
    docroot = mesh.tmp / f"www-{name}"
    docroot.mkdir(exist_ok=True)
    (docroot / "marker.txt").write_text(MARKER * 200 + "\n")
    with open(mesh.tmp / f"http-{name}.log", "w") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-m", "http.server", str(port),
                                 "--bind", bind, "--directory", str(docroot)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sh("ss", "-ltn", f"sport = :{port}", netns=netns).stdout.count("LISTEN"):
            return proc
        time.sleep(0.05)
    raise AssertionError("http server did not start")


def _curl(netns: str, url: str, timeout: int = 20) -> subprocess.CompletedProcess:
    return sh("curl", "-sS", "--max-time", str(timeout), url, netns=netns, check=False, timeout=timeout + 10)


def test_http_through_hbone_shows_only_tls_on_the_wire(mesh: Mesh) -> None:
    server = _http_server(mesh, mesh.ns["wB"], "10.2.0.2", 8080, "wb")
    pcap = mesh.tmp / "wire.pcap"
    # -Z root: tcpdump would otherwise drop to its own user and could not write into tmp_path.
    dump = subprocess.Popen(["ip", "netns", "exec", mesh.ns["nB"], "tcpdump", "-Z", "root",
                             "--immediate-mode", "-i", "b-a", "-U", "-s", "0", "-w", str(pcap), "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert b"listening on" in dump.stderr.readline(), "tcpdump did not start"
        direct = _curl(mesh.ns["wA"], "http://10.2.0.2:8080/marker.txt")
        via_vip = _curl(mesh.ns["wA"], f"http://{SERVICE_VIP}/marker.txt")
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(10)
        server.terminate()
        server.wait(10)
    assert direct.returncode == 0, direct.stderr + mesh.log("node-a") + mesh.log("node-b")
    assert direct.stdout == MARKER * 200 + "\n"
    assert via_vip.returncode == 0, via_vip.stderr + mesh.log("node-a")
    assert via_vip.stdout == MARKER * 200 + "\n"
    wire = pcap.read_bytes()
    assert len(wire) > 10000, "tcpdump captured (almost) nothing"
    assert MARKER.encode() not in wire, "the payload crossed the wire in plaintext"
    assert b"\x17\x03\x03" in wire, "no TLS application-data record on the wire"
    # The server saw the real client (source preserved by TPROXY/IP_TRANSPARENT on node B).
    access = (mesh.tmp / "http-wb.log").read_text()
    assert access.count("10.1.0.2") >= 2, access


def test_passthrough_and_inbound_plaintext(mesh: Mesh) -> None:
    outside = _http_server(mesh, mesh.ns["nB"], "10.0.0.2", 9090, "outside")
    target = _http_server(mesh, mesh.ns["wB"], "10.2.0.2", 8080, "wb")
    try:
        # Outside the mesh: plain TCP passthrough from node A, with the workload's address kept.
        out = _curl(mesh.ns["wA"], "http://10.0.0.2:9090/marker.txt")
        # From outside the mesh (node A itself is not a workload) into workload B: node B's 15006.
        inbound = _curl(mesh.ns["nA"], "http://10.2.0.2:8080/marker.txt")
    finally:
        outside.terminate()
        target.terminate()
        outside.wait(10)
        target.wait(10)
    assert out.returncode == 0, out.stderr + mesh.log("node-a")
    assert out.stdout.startswith(MARKER)
    assert "10.1.0.2" in (mesh.tmp / "http-outside.log").read_text()
    assert inbound.returncode == 0, inbound.stderr + mesh.log("node-b")
    assert inbound.stdout.startswith(MARKER)
    assert "10.0.0.1" in (mesh.tmp / "http-wb.log").read_text()


_SINK = r"""
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.2.0.2", 7000)); srv.listen(8); print("listening", flush=True)
conn, peer = srv.accept()
digest, total = hashlib.sha256(), 0
while True:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    digest.update(chunk); total += len(chunk)
conn.sendall(f"{total} {digest.hexdigest()}\n".encode()); conn.shutdown(socket.SHUT_WR); conn.close()
"""

_SOURCE = r"""
import hashlib, os, socket, sys, time
total = int(sys.argv[1])
block = bytearray(os.urandom(1 << 20))
digest = hashlib.sha256()
s = socket.create_connection(("10.2.0.2", 7000), timeout=120)
sent, i, start = 0, 0, time.monotonic()
while sent < total:
    block[:8] = i.to_bytes(8, "big"); i += 1   # every MiB differs
    chunk = bytes(block[: min(len(block), total - sent)])
    s.sendall(chunk); digest.update(chunk); sent += len(chunk)
s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    part = s.recv(4096)
    if not part:
        break
    answer += part
print(sent, digest.hexdigest(), answer.decode().strip(), round(time.monotonic() - start, 2), flush=True)
"""


@pytest.mark.timeout(900)
def test_one_gib_arrives_byte_exact(mesh: Mesh) -> None:
    sink = subprocess.Popen(["ip", "netns", "exec", mesh.ns["wB"], "python3", "-c", _SINK],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "listening"
        result = mesh.sh("python3", "-c", _SOURCE, str(SIZE), netns=mesh.ns["wA"], timeout=800)
    finally:
        sink.kill()
        sink.wait(10)
    sent, digest, got_total, got_digest, seconds = result.stdout.split()
    assert int(sent) == SIZE
    assert (int(got_total), got_digest) == (SIZE, digest), result.stdout
    print(f"{SIZE} bytes through two ztproxies in {seconds}s ({SIZE / float(seconds) / 1e6:.0f} MB/s)")


def test_killed_remote_proxy_gives_the_client_an_error_not_a_hang(mesh: Mesh) -> None:
    sink = subprocess.Popen(["ip", "netns", "exec", mesh.ns["wB"], "python3", "-c", _SINK],
                            stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert sink.stdout.readline().strip() == "listening"
        client = subprocess.Popen(["ip", "netns", "exec", mesh.ns["wA"], "python3", "-c", _SOURCE,
                                   str(1 << 40)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)  # data is flowing
        assert client.poll() is None, client.stderr.read()
        mesh.procs["node-b"].kill()
        started = time.monotonic()
        client.wait(20)
        elapsed = time.monotonic() - started
    finally:
        if client is not None:
            client.kill()
        sink.kill()
        sink.wait(10)
    assert client.returncode != 0
    err = client.stderr.read()
    assert "Connection reset" in err or "Broken pipe" in err, err
    assert elapsed < 15, f"the client needed {elapsed:.1f}s to notice"


_MANY = r"""
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
N = int(sys.argv[1])
async def one(i, started):
    reader, writer = await asyncio.open_connection("10.2.0.2", 7001)
    assert await reader.readexactly(3) == b"hi\n"   # the tunnel is up end to end
    started.append(i)
    while len(started) < N:      # hold every connection open until all are up
        await asyncio.sleep(0.05)
    message = f"hello {i}\n".encode() * 100
    writer.write(message); await writer.drain(); writer.write_eof()
    data = await reader.read()
    writer.close()
    return data == message
async def main():
    started = []
    results = await asyncio.wait_for(asyncio.gather(*(one(i, started) for i in range(N))), 240)
    print(sum(results), flush=True)
asyncio.run(main())
"""

_ECHO = r"""
import asyncio, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
async def handle(reader, writer):
    writer.write(b"hi\n")
    data = await reader.read()
    writer.write(data); await writer.drain(); writer.close()
async def main():
    server = await asyncio.start_server(handle, "10.2.0.2", 7001, backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@pytest.mark.timeout(600)
def test_thousand_concurrent_connections_share_a_pool(mesh: Mesh) -> None:
    echo = subprocess.Popen(["ip", "netns", "exec", mesh.ns["wB"], "python3", "-c", _ECHO],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().strip() == "listening"
        result = mesh.sh("python3", "-c", _MANY, "1000", netns=mesh.ns["wA"], timeout=300)
    finally:
        echo.kill()
        echo.wait(10)
    assert result.stdout.strip() == "1000", result.stderr
    # At most 100 streams per connection, pooled: node A opened 10 HBONE connections (they stay pooled
    # until the idle timeout), not one per client connection.
    established = sh("ss", "-Htn", "state", "established", "( dport = :15008 )", netns=mesh.ns["nA"]).stdout
    assert len(established.splitlines()) == 10, established + mesh.log("node-a") + mesh.log("node-b")
