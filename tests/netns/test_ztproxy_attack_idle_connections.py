"""Idle connections (issue 13 defect 4) against a real ``ztproxy run``: mutual-TLS connections that never
send the HTTP/2 preface. Each used to cost about 1 MiB (a receive buffer sized for 1 MiB frames) and was
held forever. Now buffers start at 64 KiB, a connection without preface and SETTINGS is closed after
``preface_timeout`` (GOAWAY SETTINGS_TIMEOUT), one without streams after ``idle_timeout``, and one peer
address holds at most ``max_connections_per_peer`` connections."""

from __future__ import annotations

import time

import pytest
from attack_harness import SERVER_IP, SETTINGS_TIMEOUT, Backend, Proxy, RawH2, goaway_of, normal_request

pytestmark = pytest.mark.timeout(180)

IDLE = 300


def _open_idle(proxy: Proxy, tmp_path, count: int, preface: bool = False) -> list:
    ctx = proxy.tls(tmp_path / "idle")
    clients = []
    for _ in range(count):
        clients.append(RawH2(proxy.netns, ctx, preface=preface))
    time.sleep(0.5)  # the proxy finishes the handshakes (it verifies each client certificate)
    return clients


def test_connections_without_preface_cost_little_and_are_closed(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy", preface_timeout=15, max_connections_per_peer=1000)
    try:
        before = proxy.rss_mb()
        clients = _open_idle(proxy, tmp_path, IDLE)
        time.sleep(0.5)
        held = proxy.rss_mb()
        per_connection_kib = (held - before) * 1024 / IDLE
        started = time.monotonic()
        goaway = goaway_of(clients[0], 30)
        closed_after = time.monotonic() - started
        for client in clients:
            client.close()
        time.sleep(0.5)
        after = proxy.rss_mb()
        print(f"{IDLE} connections without preface: RSS {before:.0f} -> {held:.0f} MiB "
              f"({per_connection_kib:.0f} KiB each), closed by the proxy {closed_after:.1f}s later "
              f"(GOAWAY {goaway.error_code if goaway else None}), RSS after {after:.0f} MiB")
        assert per_connection_kib < 200, proxy.tail()
        assert goaway is not None and goaway.error_code == SETTINGS_TIMEOUT, proxy.tail()
        assert normal_request(proxy, tmp_path / "normal") == 200
    finally:
        proxy.stop()
        backend.close()


def test_a_connection_without_streams_is_closed_after_the_idle_timeout(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy", idle_timeout=2)
    try:
        client = RawH2(netns, proxy.tls(tmp_path / "client"))
        sid = client.connect(f"{SERVER_IP}:8080")
        assert client.status(sid) == 200
        client.send(client.data(sid, b"bye", end=True))  # the stream ends; the connection stays idle
        started = time.monotonic()
        goaway = goaway_of(client, 15)
        took = time.monotonic() - started
        print(f"idle connection closed after {took:.1f}s")
        assert goaway is not None and goaway.error_code == 0, proxy.tail()
        assert 1.5 < took < 6
    finally:
        proxy.stop()
        backend.close()


def test_one_peer_cannot_hold_more_than_its_connections(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy", max_connections_per_peer=20)
    try:
        clients = _open_idle(proxy, tmp_path, 20, preface=True)
        # The 21st from the same address is reset at accept, before any TLS...
        with pytest.raises((ConnectionError, OSError)):
            extra = RawH2(netns, proxy.tls(tmp_path / "extra"))
            extra.handshake(2)
            extra.sock.recv(1)
        assert "already has 20 connections" in proxy.log()
        # ...while another address is served, and the first one is again once it closes some.
        other = RawH2(netns, proxy.tls(tmp_path / "other"), source_ip="127.0.0.2")
        assert other.status(other.connect(f"{SERVER_IP}:8080")) == 200
        for client in clients:
            client.close()
        time.sleep(0.5)
        assert normal_request(proxy, tmp_path / "normal") == 200
    finally:
        proxy.stop()
        backend.close()
