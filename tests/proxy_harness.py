"""Test harness for ztproxy: a PKI on disk, settings and mesh-state files, ztproxy in a thread or as a
subprocess, an independent HTTP/2 CONNECT client (h2 + ssl, no ztproxy code) and small TCP servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import h2.config
import h2.connection
import h2.events
import yaml
from pki import CA, Leaf, spiffe_id

REPO = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "cluster.local"


class MeshFiles:
    """Certificates, trust bundle, settings and mesh state of one ztproxy under a directory."""

    def __init__(self, base: Path, node: str = "node-a", trust_domain: str = TRUST_DOMAIN,
                 root: Optional[CA] = None) -> None:
        self.base = Path(base)
        self.node = node
        self.trust_domain = trust_domain
        self.root = root or CA.root()
        self.ca = self.root.intermediate()
        self.certs_dir = self.base / "certs"
        self.bundle = self.root.write_bundle(self.base / "root-cert.pem")
        self.state_path = self.base / "mesh-state.yaml"
        self.settings_path = self.base / "ztproxy.yaml"

    def identity(self, namespace: str, service_account: str) -> str:
        return spiffe_id(self.trust_domain, namespace, service_account)

    def issue(self, namespace: str, service_account: str, **kwargs: Any) -> Leaf:
        return self.ca.issue(self.identity(namespace, service_account), **kwargs)

    def install(self, namespace: str, service_account: str, leaf: Optional[Leaf] = None) -> Leaf:
        leaf = leaf or self.issue(namespace, service_account)
        leaf.write(self.certs_dir / namespace / service_account)
        return leaf

    def write_state(self, workloads: Sequence[Dict[str, Any]], services: Sequence[Dict[str, Any]] = (),
                    policies: Sequence[Dict[str, Any]] = ()) -> Path:
        text = yaml.safe_dump({"workloads": list(workloads), "services": list(services),
                               "policies": list(policies)})
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.state_path)
        return self.state_path

    def settings(self, **overrides: Any) -> Dict[str, Any]:
        settings: Dict[str, Any] = {
            "node_name": self.node,
            "trust_domain": self.trust_domain,
            "mesh_state": str(self.state_path),
            "certs_dir": str(self.certs_dir),
            "trust_bundle": str(self.bundle),
            "listen": {"outbound": "127.0.0.1:0", "inbound": "0.0.0.0:0", "inbound_plaintext": None,
                       "transparent": False},
            "preserve_source": False,
            "socket_mark": 0,  # SO_MARK needs CAP_NET_ADMIN: the unit tier runs without root
            "reload_interval": 0.2,
            "log_level": "debug",
        }
        for key, value in overrides.items():
            if key == "listen":
                settings["listen"] = dict(settings["listen"], **value)
            else:
                settings[key] = value
        return settings

    def write_settings(self, **overrides: Any) -> Path:
        self.settings_path.write_text(yaml.safe_dump(self.settings(**overrides)))
        return self.settings_path


def workload(name: str, ip: str, node: str, namespace: str = "default", service_account: Optional[str] = None,
             protocol: str = "HBONE", **extra: Any) -> Dict[str, Any]:
    """A workload entry in ztunnel's local-config format."""
    entry = {"uid": f"{namespace}/{name}", "name": name, "namespace": namespace,
             "serviceAccount": service_account or name, "workloadIps": [ip], "protocol": protocol,
             "node": node}
    entry.update(extra)
    return entry


# ---------------------------------------------------------------------------------------------------
# ztproxy in a background thread (for tests that plug in their own hooks)


class ProxyThread:
    def __init__(self, settings_dict: Dict[str, Any], authorizer: Any = None, observer: Any = None) -> None:
        from ztproxy.config import settings_from_dict
        from ztproxy.proxy import Proxy

        self.proxy = Proxy(settings_from_dict(settings_dict), authorizer, observer)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)
        return self

    def port(self, name: str) -> int:
        return self.proxy.bound[name][1]

    def call(self, fn, *args):
        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def drain(self, timeout: float = 5.0) -> bool:
        return asyncio.run_coroutine_threadsafe(self.proxy.drain(timeout), self.loop).result(timeout + 10)

    def __exit__(self, *exc: Any) -> None:
        try:
            if not self.proxy.draining:
                self.drain(1.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


# ---------------------------------------------------------------------------------------------------
# ztproxy as a subprocess


def ztproxy_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "ztproxy", *args]


def ztproxy_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def wait_for_log(proc: subprocess.Popen, log_path: Path, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log_path.read_text(errors="replace") if log_path.exists() else ""
        if text in content:
            return
        if proc.poll() is not None:
            raise AssertionError(f"ztproxy exited with {proc.returncode}:\n{content}")
        time.sleep(0.05)
    raise AssertionError(f"ztproxy did not log {text!r} within {timeout}s:\n{log_path.read_text()}")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# ---------------------------------------------------------------------------------------------------
# An independent HBONE client: h2 + ssl, blocking sockets, nothing from ztproxy


def client_tls_context(leaf: Optional[Leaf], bundle: Path, tmp: Path,
                       tls12_only: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(bundle))
    if leaf is not None:
        leaf.write(tmp, "client-chain.pem", "client-key.pem")
        ctx.load_cert_chain(str(tmp / "client-chain.pem"), str(tmp / "client-key.pem"))
    ctx.set_alpn_protocols(["h2"])
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _GoawayTolerantStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2 closes the whole connection on GOAWAY; RFC 9113 lets open streams finish, which the drain
    tests need to observe."""

    _transitions = dict(h2.connection.H2ConnectionStateMachine._transitions)
    _transitions[(h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY)] = \
        (None, h2.connection.ConnectionState.CLIENT_OPEN)


class H2TunnelClient:
    """One TLS connection, HTTP/2 CONNECT streams, driven synchronously by the test."""

    def __init__(self, address: Tuple[str, int], ctx: ssl.SSLContext, timeout: float = 10.0,
                 source_ip: Optional[str] = None) -> None:
        raw = socket.create_connection(address, timeout=timeout,
                                       source_address=(source_ip, 0) if source_ip else None)
        self.sock = ctx.wrap_socket(raw, server_hostname=None)
        # h2 before 4.4 refuses to send an RFC 9113 CONNECT (no :path); the checks are off there only.
        modern = tuple(int(x) for x in h2.__version__.split(".")[:2]) >= (4, 4)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=modern))
        self.conn.state_machine = _GoawayTolerantStateMachine()
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 << 20)
        self._send()
        self.data: Dict[int, bytearray] = {}
        self.ended: Dict[int, bool] = {}
        self.status: Dict[int, int] = {}
        self.reset: Dict[int, int] = {}
        self.goaway = None
        self.closed = False

    def peer_identity(self) -> List[str]:
        cert = self.sock.getpeercert() or {}
        return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]

    def _send(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def connect(self, authority: Optional[str], headers: Sequence[Tuple[str, str]] = (),
                end_stream: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        request = [(":method", "CONNECT")]
        if authority is not None:
            request.append((":authority", authority))
        self.conn.send_headers(sid, request + list(headers), end_stream=end_stream)
        self._send()
        self.data[sid] = bytearray()
        return sid

    def pump_once(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 20)
        except (ConnectionError, ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        for event in self.conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived):
                self.status[event.stream_id] = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended[event.stream_id] = True
            elif isinstance(event, h2.events.StreamReset):
                self.reset[event.stream_id] = event.error_code
                self.ended[event.stream_id] = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        self._send()
        return True

    def wait(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting on the HBONE server")
            if not self.pump_once():
                if predicate():
                    return
                raise AssertionError("the HBONE server closed the connection")

    def wait_status(self, sid: int, timeout: float = 10.0) -> int:
        self.wait(lambda: sid in self.status or sid in self.reset, timeout)
        return self.status.get(sid, -1)

    def send(self, sid: int, payload: bytes, end_stream: bool = False) -> None:
        view = memoryview(payload)
        while view:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.pump_once()
                continue
            self.conn.send_data(sid, view[:window].tobytes())
            view = view[window:]
            self._send()
        if end_stream:
            self.conn.end_stream(sid)
            self._send()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------------------------------------
# Small real servers


class EchoServer:
    """A threaded TCP server: echoes, or with ``upper`` returns what it received upper-cased; records
    the peer addresses it saw. Half-close aware: answers after the client's EOF when ``after_eof``."""

    def __init__(self, host: str, port: int = 0, after_eof: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.address = self.sock.getsockname()[:2]
        self.after_eof = after_eof
        self.peers: List[Tuple[str, int]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[:2])
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        received = bytearray()
        try:
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                if self.after_eof:
                    received.extend(chunk)
                else:
                    conn.sendall(chunk)
            if self.after_eof:
                conn.sendall(b"GOT " + hashlib.sha256(received).hexdigest().encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
