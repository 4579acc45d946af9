"""Harness of the attack tests (tests/netns/test_ztproxy_attack_*.py): a real ``ztproxy run`` process in a
throwaway network namespace, attacked over real TLS and real sockets by a raw HTTP/2 client that is
independent of ztproxy (``ssl`` + ``hyperframe`` + ``hpack``), and backends that count what reaches
them.

Inside the namespace everything is on loopback: the proxy's node ``node-a`` has the workloads
``default/server`` at 127.0.0.3 and ``default/other`` at 127.0.0.4, with backends on port 8080; the
mesh's client workload ``default/client`` (on ``node-b``) is 127.0.0.2; 127.0.0.5 is no workload.

``ZTPROXY_ATTACK_SOURCE=/path/to/a/checkout`` runs the proxy from another tree (used to measure the
figures before a fix against the same attacks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import hpack
import yaml
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from pki import Leaf
from proxy_harness import REPO, MeshFiles, client_tls_context, stop_process, workload, ztproxy_cmd
from pyroute2 import netns as pyroute2_netns

SERVER_IP, OTHER_IP, CLIENT_IP, STRANGER_IP = "127.0.0.3", "127.0.0.4", "127.0.0.2", "127.0.0.5"
BACKEND_PORT = 8080
HBONE = (SERVER_IP, 15008)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Settings added with the limits of issue 13 (left out when measuring an older tree)
NEW_SETTINGS = ("max_header_list_size", "header_timeout", "preface_timeout", "idle_timeout",
                "max_connections_per_peer", "max_stream_resets", "connection_write_buffer",
                "max_plaintext_connections_per_peer")
# HTTP/2 error codes the tests look for
ENHANCE_YOUR_CALM, REFUSED_STREAM, SETTINGS_TIMEOUT = 0xB, 0x7, 0x4


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Sockets created inside the block belong to namespace ``name``."""
    pyroute2_netns.pushns(name)
    try:
        yield
    finally:
        pyroute2_netns.popns()


class Backend:
    """A TCP server in the namespace that counts the connections it accepted and records how each ended
    ("fin", "reset"), its peers and bytes. ``mode``: "echo", "endless" (writes until the peer goes
    away) or "sink" (reads everything)."""

    def __init__(self, netns: str, ip: str, port: int = BACKEND_PORT, mode: str = "echo") -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(4096)
        self.mode = mode
        self.accepted = 0
        self.peers: List[Tuple[str, int]] = []
        self.endings: List[str] = []
        self.received: List[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.peers.append(peer[:2])
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        received, ending = 0, "fin"
        try:
            if self.mode == "endless":
                chunk = b"z" * 65536
                while not self._stop.is_set():
                    conn.sendall(chunk)
            else:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    received += len(data)
                    if self.mode == "echo":
                        conn.sendall(data)
        except OSError as exc:
            ending = "reset" if isinstance(exc, ConnectionResetError) else f"error {exc}"
        finally:
            conn.close()
            with self._lock:
                self.endings.append(ending)
                self.received.append(received)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


class Proxy:
    """``ztproxy run`` in namespace ``netns`` serving node-a's workloads on 15008."""

    def __init__(self, netns: str, base: Path, loop: str = "uvloop",
                 policies: Sequence[Dict[str, Any]] = (), **settings: Any) -> None:
        self.netns = netns
        self.files = MeshFiles(base, node="node-a")
        self.files.install("default", "server")
        self.files.install("default", "other")
        self.files.write_state([workload("server", SERVER_IP, "node-a"),
                                workload("other", OTHER_IP, "node-a"),
                                workload("client", CLIENT_IP, "node-b")], policies=policies)
        overrides: Dict[str, Any] = {"listen": {"outbound": None, "inbound": "0.0.0.0:15008",
                                                "inbound_plaintext": None, "dns": None, "admin": None,
                                                "metrics": None, "readiness": None},
                                     "log_level": "info"}
        listen = dict(overrides["listen"], **settings.pop("listen", {}))
        overrides.update(settings, listen=listen)
        source = os.environ.get("ZTPROXY_ATTACK_SOURCE", str(REPO))
        if source != str(REPO):  # an older tree refuses the settings it does not know: leave them out
            for key in NEW_SETTINGS:
                overrides.pop(key, None)
        self.files.write_settings(**overrides)
        self.log_path = base / "ztproxy.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = source
        if loop == "asyncio":
            env["ZTPROXY_EVENT_LOOP"] = "asyncio"
        with open(self.log_path, "wb") as out:
            # `ip netns exec` execs ztproxy in place: the pid is the proxy's own (for its RSS).
            self.proc = subprocess.Popen(["ip", "netns", "exec", netns,
                                          *ztproxy_cmd("run", "--config", str(self.files.settings_path))],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=source)
        deadline = time.monotonic() + 30
        while "ztproxy ready" not in self.log():
            assert self.proc.poll() is None, f"ztproxy exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"ztproxy not ready:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        """The end of the log, for assertion messages."""
        return self.log()[-chars:]

    def rss_mb(self) -> float:
        """Resident size of the proxy process, MiB."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client_leaf(self, *extra_uris: str) -> Leaf:
        return self.files.ca.issue(self.files.identity("default", "client"), extra_uris=extra_uris)

    def tls(self, tmp: Path, leaf: Optional[Leaf] = None) -> ssl.SSLContext:
        tmp.mkdir(parents=True, exist_ok=True)
        return client_tls_context(leaf or self.client_leaf(), self.files.bundle, tmp)

    def stop(self) -> None:
        if self.proc.poll() is None and self.rss_mb() > 1500:  # an attack that went through: no drain
            self.proc.send_signal(signal.SIGKILL)
        stop_process(self.proc)


class RawH2:
    """An HTTP/2 client over TLS that writes frames as told (hyperframe + hpack): it can do what a
    well-behaved client library refuses to (reset storms, endless header blocks, more streams than
    allowed, never reading)."""

    def __init__(self, netns: str, ctx: ssl.SSLContext, address: Tuple[str, int] = HBONE,
                 source_ip: Optional[str] = None, window: int = 65535, preface: bool = True) -> None:
        with in_netns(netns):
            raw = socket.create_connection(address, timeout=10,
                                           source_address=(source_ip, 0) if source_ip else None)
        self.sock = ctx.wrap_socket(raw)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.statuses: Dict[int, int] = {}
        self.next_stream = 1
        self._buf = b""
        self.preface_sent = preface
        if preface:
            settings = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: window})
            out = PREFACE + settings.serialize()
            if window > 65535:
                out += WindowUpdateFrame(0, window_increment=min(window, (1 << 31) - 1) - 65535).serialize()
            self.sock.sendall(out)

    def handshake(self, timeout: float = 5.0) -> Dict[int, int]:
        """Read (and acknowledge) the server's SETTINGS frames until its own values arrived (ztproxy
        sends h2's defaults, then its limits) and our SETTINGS was acknowledged; the values in force."""
        values: Dict[int, int] = {}
        seen, acked = 0, False
        for frame in self.frames(timeout):
            if isinstance(frame, SettingsFrame):
                if "ACK" in frame.flags:
                    acked = True
                else:
                    values.update(frame.settings)
                    seen += 1
            if seen >= 2 and acked:
                break
        return values

    def headers(self, authority: str, extra: Sequence[Tuple[str, str]] = (), end_headers: bool = True,
                stream_id: Optional[int] = None) -> Tuple[int, bytes]:
        """The serialized HEADERS of a CONNECT on a new stream (not sent)."""
        sid = stream_id or self.next_stream
        self.next_stream = max(self.next_stream, sid + 2)
        block = self.encoder.encode([(":method", "CONNECT"), (":authority", authority), *extra])
        frame = HeadersFrame(sid, block, flags=["END_HEADERS"] if end_headers else [])
        return sid, frame.serialize()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, authority: str, extra: Sequence[Tuple[str, str]] = ()) -> int:
        sid, frame = self.headers(authority, extra)
        self.send(frame)
        return sid

    @staticmethod
    def reset(sid: int, code: int = 0x8) -> bytes:
        return RstStreamFrame(sid, error_code=code).serialize()

    @staticmethod
    def continuation(sid: int, payload: bytes, end: bool = False) -> bytes:
        return ContinuationFrame(sid, payload, flags=["END_HEADERS"] if end else []).serialize()

    @staticmethod
    def data(sid: int, payload: bytes, end: bool = False) -> bytes:
        return DataFrame(sid, payload, flags=["END_STREAM"] if end else []).serialize()

    def frames(self, timeout: float = 5.0) -> Iterator[Frame]:
        """Frames from the server until it closes or ``timeout`` passes without a frame. SETTINGS and
        PINGs are acknowledged; a closed or reset connection ends the iteration."""
        self.sock.settimeout(timeout)
        while True:
            while len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) < 9 + length:
                    break
                frame, _ = Frame.parse_frame_header(memoryview(self._buf[:9]))
                frame.parse_body(memoryview(self._buf[9:9 + length]))
                self._buf = self._buf[9 + length:]
                # (without our preface, an ACK would be taken for a bad preface)
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags and self.preface_sent:
                    with contextlib.suppress(OSError):
                        self.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
                yield frame
            try:
                chunk = self.sock.recv(1 << 16)
            except (socket.timeout, TimeoutError):
                return
            except (OSError, ssl.SSLError):
                chunk = b""
            if not chunk:
                return
            self._buf += chunk

    def status(self, sid: int, timeout: float = 10.0) -> Optional[int]:
        """:status of stream ``sid``; None when the stream or the connection was closed without one."""
        if sid in self.statuses:
            return self.statuses[sid]
        deadline = time.monotonic() + timeout
        for frame in self.frames(timeout):
            if isinstance(frame, HeadersFrame):
                headers = dict(self.decoder.decode(frame.data, raw=True))
                self.statuses[frame.stream_id] = int(headers[b":status"])  # responses of other streams too
                if frame.stream_id == sid:
                    return self.statuses[sid]
            elif isinstance(frame, GoAwayFrame) or (isinstance(frame, RstStreamFrame)
                                                    and frame.stream_id == sid):
                return None
            if time.monotonic() > deadline:
                return None
        return None

    def close(self, reset: bool = False) -> None:
        if reset:  # an abrupt death: RST instead of FIN
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.sock.close()


def goaway_of(client: RawH2, timeout: float = 10.0) -> Optional[GoAwayFrame]:
    """The GOAWAY the server sent before closing, or None (closed without one, or still open)."""
    for frame in client.frames(timeout):
        if isinstance(frame, GoAwayFrame):
            return frame
    return None


def normal_request(proxy: Proxy, tmp: Path, timeout: float = 10.0) -> Optional[int]:
    """A well-behaved client's CONNECT to the server workload: its :status (None: no answer)."""
    try:
        client = RawH2(proxy.netns, proxy.tls(tmp))
    except OSError:
        return None
    try:
        return client.status(client.connect(f"{SERVER_IP}:{BACKEND_PORT}"), timeout)
    finally:
        client.close()


def write_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data))
