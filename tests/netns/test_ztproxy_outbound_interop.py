"""Outbound HBONE against an independent HTTP/2 server (the ``h2`` library over ``ssl`` in the test):
ztproxy runs as a subprocess in a namespace whose OUTPUT chain REDIRECTs the client's connections to
15001; the test's server plays the destination node's 15008 and checks what ztproxy sends."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

import h2.config
import h2.connection
import h2.events
import pytest
from pki import Leaf
from proxy_harness import MeshFiles, stop_process, wait_for_log, workload, ztproxy_cmd, ztproxy_env
from pyroute2 import netns as pyroute_netns

pytestmark = pytest.mark.timeout(120)
CLIENT_IP, SERVER_IP, IMPOSTOR_IP, REFUSING_IP = "10.10.0.1", "10.10.0.2", "10.10.0.3", "10.10.0.4"


def sh(*argv: str, netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, capture_output=True, text=True)


def socket_in(netns: str, family: int = socket.AF_INET) -> socket.socket:
    pyroute_netns.pushns(netns)
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    finally:
        pyroute_netns.popns()


class IndependentHboneServer:
    """A minimal HBONE destination: mTLS, answers CONNECT with ``status`` and echoes the stream."""

    def __init__(self, netns: str, ip: str, leaf: Leaf, bundle: Path, tmp: Path, status: int = 200) -> None:
        leaf.write(tmp, f"{ip}-chain.pem", f"{ip}-key.pem")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(str(tmp / f"{ip}-chain.pem"), str(tmp / f"{ip}-key.pem"))
        self.ctx.load_verify_locations(cafile=str(bundle))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.set_alpn_protocols(["h2"])
        self.status = status
        self.requests: List[Dict[str, str]] = []
        self.client_sans: List[List[str]] = []
        self.errors: List[str] = []
        self.sock = socket_in(netns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, 15008))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(str(exc))
            return
        cert = tls.getpeercert() or {}
        self.client_sans.append([v for k, v in cert.get("subjectAltName", ()) if k == "URI"])
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())
        try:
            while True:
                data = tls.recv(1 << 16)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.requests.append(dict(event.headers))
                        conn.send_headers(event.stream_id, [(":status", str(self.status))],
                                          end_stream=self.status != 200)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        conn.send_data(event.stream_id, event.data.upper())
                    elif isinstance(event, h2.events.StreamEnded):
                        conn.end_stream(event.stream_id)
                tls.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(str(exc))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def node(netns, tmp_path):
    for ip in (CLIENT_IP, SERVER_IP, IMPOSTOR_IP, REFUSING_IP):
        sh("ip", "addr", "add", f"{ip}/32", "dev", "lo", netns=netns)
    sh("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.10.0.0/24", "--dport", "8080",
       "-j", "REDIRECT", "--to-ports", "15001", netns=netns)
    files = MeshFiles(tmp_path / "node-a", node="node-a")
    files.install("default", "client")
    files.write_state([
        workload("client", CLIENT_IP, "node-a"),
        workload("server", SERVER_IP, "node-b"),
        workload("server2", IMPOSTOR_IP, "node-b", service_account="server"),
        workload("server3", REFUSING_IP, "node-b", service_account="server"),
    ])
    files.write_settings(listen={"outbound": "0.0.0.0:15001", "inbound": None, "inbound_plaintext": None,
                                 "transparent": False}, socket_mark=0x539, log_level="info")
    log = tmp_path / "ztproxy.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns] + ztproxy_cmd("run", "--config",
                                                                            str(files.settings_path)),
                                stdout=out, stderr=subprocess.STDOUT, env=ztproxy_env())
    wait_for_log(proc, log, "ztproxy ready")
    yield netns, files, log
    stop_process(proc)


def _talk(netns: str, dst: str, payload: bytes) -> Optional[bytes]:
    sock = socket_in(netns)
    sock.settimeout(15)
    sock.bind((CLIENT_IP, 0))
    try:
        sock.connect((dst, 8080))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        return None
    finally:
        sock.close()


def test_outbound_connect_headers_and_data(node, tmp_path) -> None:
    netns, files, log = node
    server = IndependentHboneServer(netns, SERVER_IP, files.issue("default", "server"), files.bundle,
                                    tmp_path)
    try:
        assert _talk(netns, SERVER_IP, b"hello through hbone") == b"HELLO THROUGH HBONE"
    finally:
        server.close()
    assert server.client_sans == [[files.identity("default", "client")]]
    request = server.requests[0]
    assert request[":method"] == "CONNECT"
    assert request[":authority"] == f"{SERVER_IP}:8080"
    assert ":path" not in request and ":scheme" not in request
    assert re.fullmatch(rf'for="{re.escape(CLIENT_IP)}:\d+"', request["forwarded"]), request
    assert "k8s.namespace.name=default" in request["baggage"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", request["traceparent"])


def test_outbound_refuses_a_server_with_the_wrong_identity(node, tmp_path) -> None:
    netns, files, log = node
    impostor = IndependentHboneServer(netns, IMPOSTOR_IP, files.issue("default", "impostor"), files.bundle,
                                      tmp_path)
    try:
        assert _talk(netns, IMPOSTOR_IP, b"secret") is None  # reset, not answered
    finally:
        impostor.close()
    assert impostor.requests == []  # no CONNECT (and no byte of payload) went to the impostor
    assert "server identity mismatch: expected spiffe://cluster.local/ns/default/sa/server" in log.read_text()


def test_outbound_connect_refused_by_the_destination_resets_the_client(node, tmp_path) -> None:
    netns, files, log = node
    refusing = IndependentHboneServer(netns, REFUSING_IP, files.issue("default", "server"), files.bundle,
                                      tmp_path, status=401)
    try:
        assert _talk(netns, REFUSING_IP, b"denied") is None
    finally:
        refusing.close()
    assert len(refusing.requests) == 1
    assert "answered 401" in log.read_text()
