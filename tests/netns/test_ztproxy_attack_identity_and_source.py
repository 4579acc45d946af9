"""What a peer with a valid mesh certificate may not claim, against a real ``ztproxy run`` (issue 13
defects 1 and 9):

* its source address: the client is the connection's own source address; a ``forwarded: for=`` header
  naming another workload no longer passes a ``sourceIps`` DENY nor makes the workload see that address;
* another local workload than the one whose certificate served the TLS connection (400, as ztunnel);
* several identities: a client certificate with more than one URI SAN is refused;
* more streams than allowed: the stream over the limit is refused (RST_STREAM REFUSED_STREAM) and the
  connection with its other streams lives on."""

from __future__ import annotations

import time

import pytest
from attack_harness import (
    BACKEND_PORT,
    CLIENT_IP,
    OTHER_IP,
    REFUSED_STREAM,
    SERVER_IP,
    STRANGER_IP,
    Backend,
    Proxy,
    RawH2,
    normal_request,
)
from hyperframe.frame import GoAwayFrame, RstStreamFrame

pytestmark = pytest.mark.timeout(120)

# DENY the attacker's network (127.0.0.5) on the server workload.
DENY_STRANGER = [{"name": "deny-lab", "namespace": "default", "scope": "Namespace", "action": "Deny",
                  "rules": [[[{"sourceIps": [f"{STRANGER_IP}/32"]}]]]}]


def test_forwarded_header_cannot_spoof_the_source_address(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    # preserve_source: the upstream socket speaks as the client, so the workload sees the address the
    # proxy believes in.
    proxy = Proxy(netns, tmp_path / "proxy", policies=DENY_STRANGER, preserve_source=True,
                  listen={"transparent": True})
    try:
        ctx = proxy.tls(tmp_path / "attacker")
        attacker = RawH2(netns, ctx, source_ip=STRANGER_IP)
        spoofed = attacker.connect(f"{SERVER_IP}:{BACKEND_PORT}", [("forwarded", f'for="{CLIENT_IP}:4444"')])
        spoofed_status = attacker.status(spoofed)
        attacker.close()
        # The workload whose address was named connects from it and is served, from that address.
        honest = RawH2(netns, ctx, source_ip=CLIENT_IP)
        honest_status = honest.status(honest.connect(f"{SERVER_IP}:{BACKEND_PORT}"))
        honest.close()
        deadline = time.monotonic() + 5
        while not backend.peers and time.monotonic() < deadline:  # its accept thread records the peer
            time.sleep(0.05)
        print(f"forwarded spoofing: {spoofed_status} for the spoofed request, {honest_status} for the "
              f"real client; the workload saw {backend.peers}")
        assert spoofed_status == 401, proxy.tail()
        assert honest_status == 200, proxy.tail()
        assert [peer[0] for peer in backend.peers] == [CLIENT_IP]
    finally:
        proxy.stop()
        backend.close()


def test_connect_to_another_local_workload_than_the_certificate_served_is_refused(netns, tmp_path) -> None:
    backends = [Backend(netns, SERVER_IP), Backend(netns, OTHER_IP)]
    proxy = Proxy(netns, tmp_path / "proxy")
    try:
        client = RawH2(netns, proxy.tls(tmp_path / "client"))  # TLS to 127.0.0.3: default/server's cert
        crossed = client.status(client.connect(f"{OTHER_IP}:{BACKEND_PORT}"))
        own = client.status(client.connect(f"{SERVER_IP}:{BACKEND_PORT}"))
        client.close()
        print(f"CONNECT across workloads: {crossed}; to the served workload: {own}")
        assert crossed == 400 and own == 200, proxy.tail()
        assert backends[1].accepted == 0
        assert "is not the workload this connection was addressed to" in proxy.log()
    finally:
        proxy.stop()
        for backend in backends:
            backend.close()


def test_a_certificate_with_several_identities_is_refused(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy")
    try:
        leaf = proxy.client_leaf(proxy.files.identity("default", "admin"))
        try:
            client = RawH2(netns, proxy.tls(tmp_path / "two", leaf))
            status = client.status(client.connect(f"{SERVER_IP}:{BACKEND_PORT}"))
            client.close()
        except OSError:
            status = None
        print(f"certificate with two URI SANs: {status}")
        assert status is None and backend.accepted == 0, proxy.tail()
        assert "2 URI SANs" in proxy.log()
        assert normal_request(proxy, tmp_path / "normal") == 200
    finally:
        proxy.stop()
        backend.close()


def test_a_stream_over_the_limit_is_refused_alone(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy", pool_max_streams=5)
    try:
        client = RawH2(netns, proxy.tls(tmp_path / "client"))
        client.handshake()
        streams = [client.connect(f"{SERVER_IP}:{BACKEND_PORT}") for _ in range(5)]
        statuses = [client.status(sid) for sid in streams]
        over = client.connect(f"{SERVER_IP}:{BACKEND_PORT}")  # the sixth, the server allows five
        refusal = None
        for frame in client.frames(5):
            if isinstance(frame, (RstStreamFrame, GoAwayFrame)):
                refusal = frame
                break
        # The connection and its five streams live on: one of them still carries data.
        client.send(client.data(streams[0], b"still here"))
        echoed = b""
        for frame in client.frames(5):
            if getattr(frame, "stream_id", None) == streams[0] and frame.type == 0:
                echoed += bytes(frame.data)
                if echoed == b"still here":
                    break
        print(f"stream over the limit: {statuses} for five, {refusal!r} for the sixth, echo {echoed!r}")
        assert statuses == [200] * 5
        assert isinstance(refusal, RstStreamFrame) and refusal.stream_id == over, proxy.tail()
        assert refusal.error_code == REFUSED_STREAM
        assert echoed == b"still here"
        client.close()
    finally:
        proxy.stop()
        backend.close()
