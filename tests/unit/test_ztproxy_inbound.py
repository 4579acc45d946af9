"""Inbound HBONE (15008) against independent peers: an HTTP/2 client built from the ``h2`` library
over the standard ``ssl`` module (no ztproxy code), and ``openssl s_client``.

Addresses are on loopback: the server workload is 127.0.0.3 (node-a, this proxy's node), the client
workload 127.0.0.2 (node-b)."""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import logging
import os
import select
import socket
import ssl
import subprocess
import time
from pathlib import Path

import h2.config
import h2.connection
import pytest
from pki import CA, now
from proxy_harness import EchoServer, H2TunnelClient, MeshFiles, ProxyThread, client_tls_context, workload

from ztproxy.hooks import ConnContext, Decision, Failure, Reason

pytestmark = pytest.mark.timeout(60)
SERVER_IP, CLIENT_IP = "127.0.0.3", "127.0.0.2"


class DenyIdentity:
    """A test Authorizer: denies one SPIFFE ID, records every context it is asked about."""

    def __init__(self, denied: str) -> None:
        self.denied = denied
        self.seen = []

    def authorize(self, conn: ConnContext) -> Decision:
        self.seen.append(conn)
        if conn.src_identity == self.denied:
            return Decision(False, f"{self.denied} is denied by the test")
        return Decision(True, "")


class RecordingObserver:
    """A test ConnectionObserver: keeps how each connection ended (None or a typed Failure)."""

    def __init__(self) -> None:
        self.closes = []

    def opened(self, conn: ConnContext) -> RecordingObserver._Tracker:
        return RecordingObserver._Tracker(self.closes)

    class _Tracker:
        def __init__(self, closes) -> None:
            self.closes = closes

        def add_sent(self, n: int) -> None:
            pass

        def add_received(self, n: int) -> None:
            pass

        def closed(self, failure=None) -> None:
            self.closes.append(failure)


@pytest.fixture
def files(tmp_path) -> MeshFiles:
    files = MeshFiles(tmp_path / "mesh")
    files.install("default", "server")
    files.write_state([workload("server", SERVER_IP, "node-a"), workload("client", CLIENT_IP, "node-b")])
    return files


@pytest.fixture
def echo() -> EchoServer:
    server = EchoServer(SERVER_IP)
    yield server
    server.close()


def _client(files: MeshFiles, app: ProxyThread, tmp_path: Path, leaf=None, **kw) -> H2TunnelClient:
    leaf = leaf if leaf is not None else files.issue("default", "client")
    ctx = client_tls_context(leaf, files.bundle, tmp_path, **kw)
    return H2TunnelClient((SERVER_IP, app.port("inbound")), ctx)


def test_connect_stream_exchanges_data_with_a_real_server(files, echo, tmp_path) -> None:
    authz = DenyIdentity("spiffe://cluster.local/ns/default/sa/nobody")
    with ProxyThread(files.settings(), authorizer=authz) as app:
        client = _client(files, app, tmp_path)
        assert client.peer_identity() == ["spiffe://cluster.local/ns/default/sa/server"]
        assert client.sock.version() == "TLSv1.3"
        assert client.sock.selected_alpn_protocol() == "h2"
        sid = client.connect(f"{SERVER_IP}:{echo.address[1]}",
                             [("forwarded", f'for="{CLIENT_IP}:40000"'),
                              ("baggage", "k8s.namespace.name=default"),
                              ("traceparent", "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01")])
        assert client.wait_status(sid) == 200
        payload = bytes(range(256)) * 8192  # 2 MiB: more than one stream window of the client
        client.send(sid, payload, end_stream=True)
        client.wait(lambda: client.ended.get(sid))
        assert bytes(client.data[sid]) == payload
        client_address = client.sock.getsockname()[:2]
        client.close()
    ctx = authz.seen[0]
    assert (ctx.direction, ctx.reporter, ctx.protocol, ctx.security_policy) == \
        ("inbound", "destination", "HBONE", "mutual_tls")
    assert ctx.src_identity == "spiffe://cluster.local/ns/default/sa/client"
    # The client is the connection's source address; the `forwarded` header is never trusted (issue 13).
    # Telemetry labels the source with the workload `forwarded` names, as it holds the certificate's
    # identity.
    assert (ctx.src_ip, ctx.src_port) == client_address
    assert ctx.src_workload.name == "client" and ctx.dst_workload.name == "server"
    assert (ctx.dst_ip, ctx.dst_port) == (SERVER_IP, echo.address[1])


def test_half_close_travels_both_ways(files, tmp_path) -> None:
    server = EchoServer(SERVER_IP, after_eof=True)  # answers only after it saw our EOF
    try:
        with ProxyThread(files.settings()) as app:
            client = _client(files, app, tmp_path)
            sid = client.connect(f"{SERVER_IP}:{server.address[1]}")
            assert client.wait_status(sid) == 200
            client.send(sid, b"x" * 100000, end_stream=True)  # END_STREAM -> shutdown(SHUT_WR)
            client.wait(lambda: client.ended.get(sid))         # server's FIN -> END_STREAM
            expected = b"GOT " + hashlib.sha256(b"x" * 100000).hexdigest().encode() + b"\n"
            assert bytes(client.data[sid]) == expected
            assert sid not in client.reset
    finally:
        server.close()


def test_status_codes(files, echo, tmp_path) -> None:
    denied = files.identity("default", "client")
    closed_port = socket.socket()
    closed_port.bind((SERVER_IP, 0))
    port = closed_port.getsockname()[1]
    closed_port.close()
    observer = RecordingObserver()
    with ProxyThread(files.settings(), authorizer=DenyIdentity(denied), observer=observer) as app:
        client = _client(files, app, tmp_path)
        assert client.wait_status(client.connect(f"{SERVER_IP}:{echo.address[1]}")) == 401
        assert observer.closes == []  # a denial is recorded by the authorizer, never opened here
        other = _client(files, app, tmp_path, leaf=files.issue("default", "friend"))
        assert other.wait_status(other.connect(f"{SERVER_IP}:{port}")) == 503
        # The failure is a value: its reason, not its text, says the upstream connect failed. (The
        # proxy's thread may record it just after the client read the 503.)
        deadline = time.monotonic() + 10
        while not observer.closes and time.monotonic() < deadline:
            time.sleep(0.01)
        (failure,) = observer.closes
        assert isinstance(failure, Failure) and failure.reason is Reason.CONNECT_FAILED
        assert failure.reason.response_flag == "CONNECT"
        assert other.wait_status(other.connect(f"{CLIENT_IP}:{echo.address[1]}")) == 400  # not on this node
        assert other.wait_status(other.connect("not-an-address")) == 400
        assert other.wait_status(other.connect(f"{SERVER_IP}:{echo.address[1]}")) == 200  # still serving


def _refused(files: MeshFiles, app: ProxyThread, ctx: ssl.SSLContext) -> str:
    """Connect, try one CONNECT; return why it failed (it must fail)."""
    try:
        client = H2TunnelClient((SERVER_IP, app.port("inbound")), ctx)
        sid = client.connect(f"{SERVER_IP}:1")
        client.wait_status(sid, timeout=5)
    except (ssl.SSLError, ConnectionError, OSError, AssertionError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        assert "timed out" not in reason, "refusal must be prompt, not a hang"
        return reason
    raise AssertionError("the connection was accepted")


def test_bad_client_certificates_are_refused(files, tmp_path) -> None:
    foreign_domain = files.ca.issue("spiffe://evil.example/ns/default/sa/client")
    expired = files.ca.issue(files.identity("default", "client"),
                             not_after=now() - datetime.timedelta(hours=1))
    untrusted = CA.root("stranger").issue(files.identity("default", "client"))
    with ProxyThread(files.settings()) as app:
        for leaf in (foreign_domain, expired, untrusted, None):
            _refused(files, app, client_tls_context(leaf, files.bundle, tmp_path))
        # and the proxy keeps serving good clients
        good = _client(files, app, tmp_path)
        sid = good.connect(f"{SERVER_IP}:1")
        assert good.wait_status(sid) == 503


def test_client_checks_the_server_identity(files, tmp_path) -> None:
    """The other direction of mutual TLS: the server presents exactly the workload's identity, so a
    client that expects another identity can tell (the outbound side of ztproxy relies on this)."""
    with ProxyThread(files.settings()) as app:
        client = _client(files, app, tmp_path)
        assert client.peer_identity() == [files.identity("default", "server")]


def test_tls12_and_plaintext_are_refused(files) -> None:
    with ProxyThread(files.settings()) as app:
        port = app.port("inbound")
        proc = subprocess.run(["openssl", "s_client", "-tls1_2", "-connect", f"{SERVER_IP}:{port}",
                               "-alpn", "h2"], input="", capture_output=True, text=True, timeout=20)
        assert proc.returncode != 0
        assert "Cipher is (NONE)" in proc.stdout or "alert" in proc.stderr.lower(), proc.stdout + proc.stderr
        # Plaintext HTTP/2 preface: no TLS, no service.
        with socket.create_connection((SERVER_IP, port), timeout=10) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64)
            sock.settimeout(10)
            try:
                answer = sock.recv(4096)
            except ConnectionResetError:
                answer = b""
            assert b"HTTP" not in answer and b"\x00\x00\x12\x04" not in answer  # no SETTINGS frame back


def _h2_answer_with_suite(port: int, suite: str, tmp_path: Path, files: MeshFiles) -> bytes:
    """What the server sends after a TLS 1.3 handshake limited to ``suite`` and an HTTP/2 preface
    (``openssl s_client`` as the independent client, with a valid client certificate)."""
    leaf = files.issue("default", "client")
    leaf.write(tmp_path, "s-client-chain.pem", "s-client-key.pem")
    (tmp_path / "s-client-intermediate.pem").write_bytes(files.ca.pem())
    proc = subprocess.Popen(["openssl", "s_client", "-quiet", "-tls1_3", "-ciphersuites", suite,
                             "-alpn", "h2", "-cert", str(tmp_path / "s-client-chain.pem"),
                             "-cert_chain", str(tmp_path / "s-client-intermediate.pem"),
                             "-key", str(tmp_path / "s-client-key.pem"), "-connect", f"{SERVER_IP}:{port}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        return os.read(proc.stdout.fileno(), 4096) if ready else b"(nothing within 10 s)"
    finally:
        proc.kill()
        proc.wait()


def test_only_hbone_cipher_suites_are_served(files, tmp_path) -> None:
    with ProxyThread(files.settings()) as app:
        port = app.port("inbound")
        # AES-GCM: the server answers the preface with its SETTINGS frame (type 0x04).
        answer = _h2_answer_with_suite(port, "TLS_AES_128_GCM_SHA256", tmp_path, files)
        assert len(answer) >= 9 and answer[3] == 0x04, answer
        # CHACHA20 is TLS 1.3 but not an HBONE suite: closed before any HTTP/2 byte.
        assert _h2_answer_with_suite(port, "TLS_CHACHA20_POLY1305_SHA256", tmp_path, files) == b""


def test_malformed_http2_gets_an_error_and_the_proxy_keeps_serving(files, echo, tmp_path) -> None:
    with ProxyThread(files.settings()) as app:
        leaf = files.issue("default", "client")
        # Garbage after the connection preface: a connection error (GOAWAY or close).
        bad = _client(files, app, tmp_path, leaf=leaf)
        bad.sock.sendall(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"garbage!" * 4)  # bad frame
        deadline = time.monotonic() + 10
        while not bad.closed and bad.goaway is None and time.monotonic() < deadline:
            bad.pump_once()
        assert bad.closed or bad.goaway is not None
        # CONNECT without :authority, sent by an h2 client with header validation off.
        raw = H2TunnelClient.__new__(H2TunnelClient)
        ctx = client_tls_context(leaf, files.bundle, tmp_path)
        raw.sock = ctx.wrap_socket(socket.create_connection((SERVER_IP, app.port("inbound")), timeout=10))
        raw.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False))
        raw.conn.initiate_connection()
        raw.data, raw.ended, raw.status, raw.reset, raw.goaway, raw.closed = {}, {}, {}, {}, None, False
        raw._send()
        sid = raw.connect(None)
        deadline = time.monotonic() + 10
        while sid not in raw.status and not raw.closed and raw.goaway is None and time.monotonic() < deadline:
            raw.pump_once()
        assert raw.status.get(sid) == 400 or raw.closed or raw.goaway is not None
        # The proxy still serves.
        good = _client(files, app, tmp_path, leaf=leaf)
        sid = good.connect(f"{SERVER_IP}:{echo.address[1]}")
        assert good.wait_status(sid) == 200
        good.send(sid, b"still here", end_stream=True)
        good.wait(lambda: good.ended.get(sid))
        assert bytes(good.data[sid]) == b"still here"


def test_certificate_rotation_new_connections_use_the_new_certificate(files, echo, tmp_path) -> None:
    with ProxyThread(files.settings(reload_interval=0.1)) as app:
        old = _client(files, app, tmp_path)
        old_serial = old.sock.getpeercert(binary_form=True)
        sid = old.connect(f"{SERVER_IP}:{echo.address[1]}")
        assert old.wait_status(sid) == 200
        files.install("default", "server")  # renewal: atomic replace
        deadline = time.monotonic() + 10
        while True:
            new = _client(files, app, tmp_path)
            if new.sock.getpeercert(binary_form=True) != old_serial:
                break
            new.close()
            assert time.monotonic() < deadline, "the renewed certificate was not picked up"
            time.sleep(0.1)
        # the connection made before the renewal still works
        old.send(sid, b"ping", end_stream=True)
        old.wait(lambda: old.ended.get(sid))
        assert bytes(old.data[sid]) == b"ping"
        # a broken renewal is rejected and the last good certificate stays in use
        (files.certs_dir / "default" / "server" / "cert-chain.pem").write_text("garbage")
        time.sleep(0.5)
        after = _client(files, app, tmp_path)
        assert after.peer_identity() == [files.identity("default", "server")]


def test_mesh_state_reload_keeps_live_connections(files, echo, tmp_path) -> None:
    new_target = EchoServer("127.0.0.4")
    try:
        with ProxyThread(files.settings(reload_interval=0.1)) as app:
            client = _client(files, app, tmp_path)
            live = client.connect(f"{SERVER_IP}:{echo.address[1]}")
            assert client.wait_status(live) == 200
            # 127.0.0.4 is not a workload of this node yet
            assert client.wait_status(client.connect(f"127.0.0.4:{new_target.address[1]}")) == 400
            files.write_state([workload("server", SERVER_IP, "node-a"),
                               workload("client", "127.0.0.2", "node-b"),
                               workload("server2", "127.0.0.4", "node-a", service_account="server")])
            # The new workload is reached over a connection addressed to it (its own certificate); a
            # CONNECT to it over the connection to 127.0.0.3 is refused (issue 13, as ztunnel).
            def reaches_new_workload() -> bool:
                try:  # reset at accept while 127.0.0.4 is not a workload of this node yet
                    other = H2TunnelClient(("127.0.0.4", app.port("inbound")),
                                           client_tls_context(files.issue("default", "client"),
                                                              files.bundle, tmp_path))
                except OSError:
                    return False
                try:
                    return other.wait_status(other.connect(f"127.0.0.4:{new_target.address[1]}")) == 200
                finally:
                    other.close()

            deadline = time.monotonic() + 10
            while not reaches_new_workload():
                assert time.monotonic() < deadline, "the new mesh state was not picked up"
                time.sleep(0.1)
            assert client.wait_status(client.connect(f"127.0.0.4:{new_target.address[1]}")) == 400
            # a malformed file is rejected: the state in force stays
            files.state_path.write_text("workloads: [{name: broken}]\n")
            time.sleep(0.5)
            assert reaches_new_workload()
            # the connection opened before both reloads still carries data
            client.send(live, b"alive", end_stream=True)
            client.wait(lambda: client.ended.get(live))
            assert bytes(client.data[live]) == b"alive"
    finally:
        new_target.close()


class _KeepRecords(logging.Handler):
    """A handler that keeps every record, as a queue under load or a test's log capture does."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_kept_log_record_does_not_pin_a_closed_connection(files, tmp_path) -> None:
    """The long fuzz run of issue 13 grew to 3.7 GB: each connection closed for a protocol error left
    a warning whose record held the exception, its traceback, and through the frames the whole
    connection (about 400 KiB). Records a peer can cause carry strings only."""
    keep = _KeepRecords()
    logging.getLogger().addHandler(keep)
    try:
        with ProxyThread(files.settings(log_level="info")) as app:
            ctx = client_tls_context(files.issue("default", "client"), files.bundle, tmp_path)
            for _ in range(20):
                raw = socket.create_connection((SERVER_IP, app.port("inbound")), timeout=10)
                with ctx.wrap_socket(raw, server_hostname=None) as sock:
                    # the preface, then DATA on stream 0: a connection error (GOAWAY, close)
                    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                                 + b"\x00\x00\x06\x00\x00\x00\x00\x00\x00abcdef")
                    with contextlib.suppress(OSError):
                        while sock.recv(65536):
                            pass
            deadline = time.monotonic() + 10
            while "HTTP/2 protocol error" not in " ".join(r.getMessage() for r in keep.records):
                assert time.monotonic() < deadline, "no protocol error was logged"
                time.sleep(0.05)
        gc.collect()
        pinned = [arg for record in keep.records for arg in (record.args or ())
                  if isinstance(arg, BaseException)]
        assert not pinned, pinned[:3]
        sessions = [o for o in gc.get_objects() if type(o).__name__ == "HboneServerSession"]
        assert not sessions, f"{len(sessions)} closed HBONE sessions still alive"
    finally:
        logging.getLogger().removeHandler(keep)
