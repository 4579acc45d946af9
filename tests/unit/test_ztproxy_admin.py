"""Admin (config_dump, logging, quitquitquit) and readiness endpoints over real HTTP (urllib, curl),
and the HTTP server's defences (bounded head, timeouts, malformed requests)."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import ztproxy.admin as admin
from ztproxy.admin import HttpServer, Readiness, admin_routes, readiness_routes
from ztproxy.config import settings_from_dict
from ztproxy.state import parse_mesh_state

pytestmark = pytest.mark.timeout(60)

SPIFFE = "spiffe://cluster.local/ns/shop/sa/web"


def make_cert() -> Tuple[x509.Certificate, x509.Certificate, bytes]:
    """A CA and a SPIFFE leaf signed by it (ECDSA P-256, as the mesh issues them), and the leaf's key."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, day, hours24 = now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=1), \
        now + datetime.timedelta(hours=24)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztmesh test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(0xABCDEF123456)
            .not_valid_before(start).not_valid_after(hours24)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca, leaf, key_pem


class Servers:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.quit_calls: List[str] = []
        self.readiness = Readiness("certificates", "mesh_state", "listeners")
        ca, leaf, key_pem = make_cert()
        self.leaf = leaf
        self.key_pem = key_pem
        settings = settings_from_dict({"node_name": "n1", "trust_domain": "cluster.local"})
        state = parse_mesh_state({"workloads": [{"uid": "w", "name": "web", "namespace": "shop",
                                                 "serviceAccount": "web", "workloadIps": ["10.0.0.1"],
                                                 "node": "n1"}]}, "cluster.local")

        async def quit_() -> None:
            self.quit_calls.append("quit")

        routes = admin_routes(
            settings=lambda: settings,
            mesh_state=lambda: state,
            # a PEM chain as bytes, and an x509 object; a key that slipped into an extra provider
            certificates=lambda: [leaf.public_bytes(serialization.Encoding.PEM), ca],
            on_quit=quit_,
            extra={"identity_files": lambda: {"key_pem": key_pem.decode(), "private_key": "/x/key.pem",
                                              "note": key_pem.decode()}},
        )
        self.admin = HttpServer("admin", routes)
        self.ready = HttpServer("readiness", readiness_routes(self.readiness))
        self.run(self.admin.start("127.0.0.1", 0))
        self.run(self.ready.start("127.0.0.1", 0))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.admin.close())
        self.run(self.ready.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def servers():
    levels = {name: logging.getLogger(name).level for name in ("ztproxy", "ztproxy.access", "ztproxy.dns")}
    s = Servers()
    yield s
    s.close()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def http(port: int, path: str, method: str = "GET") -> Tuple[int, str, Dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_config_dump_shows_state_and_certificates_but_no_key(servers):
    status, body, headers = http(servers.admin.port, "/config_dump")
    assert status == 200 and headers["Content-Type"] == "application/json"
    dump = json.loads(body)
    assert dump["settings"]["node_name"] == "n1"
    assert dump["settings"]["listen"]["inbound"] == ["0.0.0.0", 15008]
    (workload,) = dump["mesh_state"]["workloads"]
    assert workload["name"] == "web" and workload["workload_ips"] == ["10.0.0.1"]
    leaf, ca = dump["certificates"]
    assert leaf["identity"] == SPIFFE and leaf["serial"] == "abcdef123456" and not leaf["is_ca"]
    assert 0 < leaf["seconds_to_expiry"] <= 24 * 3600 and not leaf["expired"]
    assert leaf["not_after"] == servers.leaf.not_valid_after_utc.isoformat()
    assert ca["is_ca"] and ca["identity"] is None
    redacted = "<redacted>"
    assert dump["identity_files"] == {"key_pem": redacted, "private_key": redacted, "note": redacted}
    assert "PRIVATE KEY" not in body and servers.key_pem.decode().splitlines()[1] not in body


def test_logging_levels_change_at_run_time(servers):
    port = servers.admin.port
    status, body, _ = http(port, "/logging")
    assert status == 200 and "ztproxy" in json.loads(body)["levels"]
    status, body, _ = http(port, "/logging?level=debug", "POST")
    assert status == 200 and logging.getLogger("ztproxy").level == logging.DEBUG
    assert json.loads(body)["levels"]["ztproxy"] == "debug"
    status, _, _ = http(port, "/logging?ztproxy.access=warning", "PUT")
    assert status == 200 and logging.getLogger("ztproxy.access").level == logging.WARNING
    status, _, _ = http(port, "/logging?level=dns:error,access:info", "POST")  # ztunnel's form
    assert status == 200
    assert logging.getLogger("ztproxy.dns").level == logging.ERROR
    assert logging.getLogger("ztproxy.access").level == logging.INFO
    # a bad level is refused and changes nothing, not even the valid part
    status, body, _ = http(port, "/logging?ztproxy.access=debug&level=loud", "POST")
    assert status == 400 and "'loud' is not a level" in body
    assert logging.getLogger("ztproxy.access").level == logging.INFO
    status, body, _ = http(port, "/logging", "POST")
    assert status == 400 and "nothing to change" in body


def test_quitquitquit_needs_post_and_triggers_the_drain(servers):
    status, _, headers = http(servers.admin.port, "/quitquitquit")
    assert status == 405 and headers["Allow"] == "POST" and servers.quit_calls == []
    status, body, _ = http(servers.admin.port, "/quitquitquit", "POST")
    assert status == 200 and body == "OK\n"
    servers.run(asyncio.sleep(0.05))
    assert servers.quit_calls == ["quit"]


def test_readiness_follows_its_blockers(servers):
    port = servers.ready.port
    status, body, _ = http(port, "/healthz/ready")
    assert status == 503 and body == "not ready: waiting for certificates, mesh_state, listeners\n"
    for name in ("certificates", "mesh_state"):
        servers.loop.call_soon_threadsafe(servers.readiness.ready, name)
    status, body, _ = http(port, "/healthz/ready")
    assert status == 503 and body == "not ready: waiting for listeners\n"
    servers.loop.call_soon_threadsafe(servers.readiness.ready, "listeners")
    assert http(port, "/healthz/ready")[:2] == (200, "ready\n")
    assert http(port, "/nope")[0] == 404


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_curl_as_an_operator_would(servers):
    def curl(*args: str) -> str:
        return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True,
                              timeout=20).stdout

    port = servers.admin.port
    assert json.loads(curl(f"http://127.0.0.1:{port}/config_dump"))["certificates"][0]["identity"] == SPIFFE
    assert json.loads(curl("-X", "POST", f"http://127.0.0.1:{port}/logging?level=warning"))["levels"][
        "ztproxy"] == "warning"
    ready_url = f"http://127.0.0.1:{servers.ready.port}/healthz/ready"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", ready_url) == "503"
    assert curl("-I", f"http://127.0.0.1:{port}/config_dump").startswith("HTTP/1.1 200")  # HEAD


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if data:
            sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /config_dump HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    (b"NOT A REQUEST\r\n\r\n", b"400"),
    (b"GET /config_dump HTTP/2.0\r\n\r\n", b"505"),
    (b"GET /config_dump HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
    (b"POST /logging?level=debug HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411"),
    (b"POST /logging?level=debug HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", b"413"),
    (b"GET /config_dump HTTP/1.0\r\n\r\n", b"200"),
])
def test_http_server_defends_itself(servers, request_bytes, status):
    reply = raw(servers.admin.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:100]


def test_slow_client_times_out(servers, monkeypatch):
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT", 0.3)
    reply = raw(servers.admin.port, b"GET /config_dump HTTP/1.1\r\n")  # never finishes its head
    assert reply.startswith(b"HTTP/1.1 408")


def test_to_jsonable_redacts_wherever_keys_hide():
    key = "-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----\n"
    data: Dict[str, Optional[Any]] = {"nested": [{"token": "t"}, key, key.encode()], "password": "p",
                                      "path": "/etc/x", "tags": {"b", "a"}}
    assert admin.to_jsonable(data) == {"nested": [{"token": "<redacted>"}, "<redacted>", "<redacted>"],
                                       "password": "<redacted>", "path": "/etc/x", "tags": ["a", "b"]}
