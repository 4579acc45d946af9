"""Rapid reset (CVE-2023-44487 class, issue 13 defect 2) against a real ``ztproxy run``: a client with a
valid mesh certificate sends HEADERS + RST_STREAM pairs on one connection. Each request used to start an
upstream connect that the reset did not cancel (30,000 pairs opened about 15,000 backend connections
and exhausted file descriptors). Now a reset cancels the stream's connect, and a connection that resets
more than ``max_stream_resets`` streams within 10 s is closed with GOAWAY ENHANCE_YOUR_CALM."""

from __future__ import annotations

import time

import pytest
from attack_harness import (
    BACKEND_PORT,
    ENHANCE_YOUR_CALM,
    SERVER_IP,
    Backend,
    Proxy,
    RawH2,
    goaway_of,
    normal_request,
)

pytestmark = pytest.mark.timeout(120)

PAIRS = 3000  # bounded attack: 3,000 HEADERS + RST_STREAM pairs in batches of 100


def test_reset_storm_opens_few_backend_connections_and_is_cut_off(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy")
    try:
        attacker = RawH2(netns, proxy.tls(tmp_path / "attacker"))
        started = time.monotonic()
        sent = 0
        try:
            while sent < PAIRS:
                batch = b""
                for _ in range(100):
                    sid, headers = attacker.headers(f"{SERVER_IP}:{BACKEND_PORT}")
                    batch += headers + attacker.reset(sid)
                attacker.send(batch)
                sent += 100
        except OSError:
            pass  # the proxy closed the connection: the budget did its job
        goaway = goaway_of(attacker, timeout=10)
        attacker.close()
        time.sleep(1.0)  # connects in flight land (or not) on the backend
        opened = backend.accepted
        # A normal client is served at once afterwards.
        status = normal_request(proxy, tmp_path / "normal")
        recovered = time.monotonic() - started
        print(f"rapid reset: {sent} pairs sent, backend connections opened {opened}, GOAWAY "
              f"{goaway.error_code if goaway else None}, normal request {status} at {recovered:.1f}s, "
              f"proxy RSS {proxy.rss_mb():.0f} MiB")
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM, proxy.tail()
        assert sent < PAIRS or goaway is not None
        # The budget is 200 resets per 10 s; cancelled connects mostly never reach the backend.
        assert opened <= 250, f"{opened} backend connections for reset streams"
        assert status == 200, proxy.tail()
        assert proxy.alive()
    finally:
        proxy.stop()
        backend.close()


def test_resets_under_the_budget_keep_the_connection(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy", max_stream_resets=50)
    try:
        client = RawH2(netns, proxy.tls(tmp_path / "client"))
        for _ in range(40):  # a client that cancels now and then: under the budget
            sid, headers = client.headers(f"{SERVER_IP}:{BACKEND_PORT}")
            client.send(headers + client.reset(sid))
        sid = client.connect(f"{SERVER_IP}:{BACKEND_PORT}")
        assert client.status(sid) == 200, proxy.tail()
        for _ in range(20):  # over it: 60 > 50
            sid, headers = client.headers(f"{SERVER_IP}:{BACKEND_PORT}")
            client.send(headers + client.reset(sid))
        goaway = goaway_of(client)
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
        assert "streams reset within 10s" in proxy.log()
    finally:
        proxy.stop()
        backend.close()
