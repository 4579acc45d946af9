"""A failed stream reaches the application as a TCP reset, never as a clean FIN (issue 13 defect 6),
against a real ``ztproxy run``: the peer proxy (here a raw HTTP/2 client) dies mid-transfer, or resets
the stream. ``transport.abort()`` closes the socket, which the kernel ends with a FIN when no received
byte is unread: the workload took a truncated transfer for a complete one. Now every abort of a proxied
TCP connection sets SO_LINGER 0 first, so the workload sees ECONNRESET."""

from __future__ import annotations

import time

import pytest
from attack_harness import BACKEND_PORT, SERVER_IP, Backend, Proxy, RawH2

pytestmark = pytest.mark.timeout(120)

CHUNK = b"x" * 16384


def _wait_ending(backend: Backend, count: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while len(backend.endings) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(backend.endings)


@pytest.mark.parametrize("how", ["peer dies", "stream reset"])
def test_the_workload_sees_a_reset_when_the_peer_fails_mid_transfer(netns, tmp_path, how) -> None:
    backend = Backend(netns, SERVER_IP, mode="sink")
    proxy = Proxy(netns, tmp_path / "proxy")
    try:
        client = RawH2(netns, proxy.tls(tmp_path / "client"))
        sid = client.connect(f"{SERVER_IP}:{BACKEND_PORT}")
        assert client.status(sid) == 200
        for _ in range(32):  # 512 KiB of a transfer that never completes
            client.send(client.data(sid, CHUNK))
        time.sleep(0.5)
        if how == "peer dies":
            client.close(reset=True)
        else:
            client.send(client.reset(sid, 0x2))  # INTERNAL_ERROR
        endings = _wait_ending(backend, 1)
        print(f"{how}: the workload saw {endings} after {backend.received} bytes")
        assert endings == ["reset"], proxy.tail()
        client.close()
    finally:
        proxy.stop()
        backend.close()


def test_a_complete_transfer_still_ends_with_a_fin(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP, mode="sink")
    proxy = Proxy(netns, tmp_path / "proxy")
    try:
        client = RawH2(netns, proxy.tls(tmp_path / "client"))
        sid = client.connect(f"{SERVER_IP}:{BACKEND_PORT}")
        assert client.status(sid) == 200
        client.send(client.data(sid, CHUNK) + client.data(sid, b"", end=True))
        assert _wait_ending(backend, 1) == ["fin"]
        assert backend.received == [len(CHUNK)]
        client.close()
    finally:
        proxy.stop()
        backend.close()
