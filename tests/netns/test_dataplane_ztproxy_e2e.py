"""End to end on the role-built data plane with the real proxy: two simulated nodes built by
roles/ztmesh_node, ``ztproxy run`` in each proxy namespace, curl from a workload on node1 to an HTTP
server on node2. The payload must cross the underlay only inside TLS, and the server must see the real
client address.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dataplane"))
from dp_harness import Topology, run_role, sh  # noqa: E402
from pki import CA  # noqa: E402
from proxy_harness import MeshFiles, stop_process, wait_for_log, workload, ztproxy_cmd, ztproxy_env  # noqa: E402

pytestmark = pytest.mark.timeout(600)
MARKER = "ZTMESH-DATAPLANE-E2E-5c1d"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Topology]:
    topo = Topology(f"dpe{os.getpid() % 100000}")
    procs = []
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(run_role, topo.nodes))
        root = CA.root()
        workloads = []
        for node in topo.nodes:
            workloads.append(workload(f"host{node.index}", node.ip, f"node-{node.index}", namespace="hosts"))
            workloads.append(workload(f"c{node.index}", node.contained_ip, f"node-{node.index}",
                                      namespace="apps"))
        for node in topo.nodes:
            files = MeshFiles(topo.workdir / f"ztproxy-{node.index}", node=f"node-{node.index}", root=root)
            files.install("hosts", f"host{node.index}")
            files.install("apps", f"c{node.index}")
            files.write_state(workloads)
            files.write_settings(listen={"outbound": "0.0.0.0:15001", "inbound": "0.0.0.0:15008",
                                         "inbound_plaintext": "0.0.0.0:15006", "transparent": True},
                                 preserve_source=True, socket_mark=0x539, log_level="info")
            log = topo.workdir / f"ztproxy-{node.index}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(["ip", "netns", "exec", node.proxy_ns]
                                        + ztproxy_cmd("run", "--config", str(files.settings_path)),
                                        stdout=out, stderr=subprocess.STDOUT, env=ztproxy_env())
            procs.append(proc)
            wait_for_log(proc, log, "ztproxy ready", timeout=30)
        docroot = topo.workdir / "www"
        docroot.mkdir()
        (docroot / "marker.txt").write_text(MARKER * 100 + "\n")
        n2 = topo.nodes[1]
        for ns, name in ((n2.ns, "host2"), (n2.contained_ns, "c2")):
            log = open(topo.workdir / f"http-{name}.log", "w")  # noqa: SIM115 (closed with the process)
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server",
                                           "8080", "--directory", str(docroot)], stdout=log, stderr=log))
        for ns in (n2.ns, n2.contained_ns):
            deadline = time.monotonic() + 10
            while "LISTEN" not in sh("ss", "-ltn", "sport = :8080", ns=ns).stdout:
                assert time.monotonic() < deadline, "http server did not start"
                time.sleep(0.05)
        yield topo
    finally:
        for proc in procs:
            stop_process(proc)
        topo.close()


@pytest.mark.parametrize("client", ["contained", "host"])
@pytest.mark.parametrize("server", ["contained", "host"])
def test_curl_through_hbone_between_role_built_nodes(mesh, client, server):
    n1, n2 = mesh.nodes
    src_ns, src_ip = (n1.contained_ns, n1.contained_ip) if client == "contained" else (n1.ns, n1.ip)
    dst_ip, name = (n2.contained_ip, "c2") if server == "contained" else (n2.ip, "host2")
    pcap = mesh.workdir / f"wire-{client}-{server}.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", mesh.ul, "tcpdump", "-Z", "root", "--immediate-mode",
                             "-i", "br0", "-U", "-s", "0", "-w", str(pcap), "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert b"listening on" in dump.stderr.readline(), "tcpdump did not start"
        curl = sh("curl", "-sS", "--max-time", "20", f"http://{dst_ip}:8080/marker.txt", ns=src_ns,
                  check=False, timeout=40)
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(10)
    logs = "".join((mesh.workdir / f"ztproxy-{i}.log").read_text() for i in (1, 2))
    assert curl.returncode == 0, curl.stderr + logs
    assert curl.stdout == MARKER * 100 + "\n"
    wire = pcap.read_bytes()
    assert MARKER.encode() not in wire, "the payload crossed the underlay in plaintext"
    assert b"\x17\x03\x03" in wire, "no TLS application data on the underlay"
    access = (mesh.workdir / f"http-{name}.log").read_text()
    assert src_ip in access, access
