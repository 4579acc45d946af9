"""CONTINUATION flood (issue 13 defect 5) against a real ``ztproxy run``: HEADERS without END_HEADERS
followed by CONTINUATION frames, on 10 connections at once. h2 buffers up to 64 frames of the
advertised frame size per connection (1 MiB frames: 63 MiB each, 700 MB for ten, never returned). Now
the proxy advertises 64 KiB frames, a header block may hold ``max_header_list_size`` (16 KiB) and must
be complete within ``header_timeout``; a peer past either gets GOAWAY ENHANCE_YOUR_CALM."""

from __future__ import annotations

import time

import pytest
from attack_harness import ENHANCE_YOUR_CALM, SERVER_IP, Backend, Proxy, RawH2, goaway_of, normal_request
from hyperframe.frame import SettingsFrame

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 10
FRAMES = 63


def test_continuation_flood_is_cut_at_the_header_limit(netns, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    proxy = Proxy(netns, tmp_path / "proxy")
    try:
        before = proxy.rss_mb()
        clients = [RawH2(netns, proxy.tls(tmp_path / f"c{i}")) for i in range(CONNECTIONS)]
        # Settled before the flood: a SETTINGS ACK inside a header block is a protocol error.
        advertised = [client.handshake() for client in clients][0]
        # The largest frame the proxy accepts is what it advertised (h2's default 16 KiB until then).
        frame_size = max(advertised.get(SettingsFrame.MAX_FRAME_SIZE, 16384), 16384)
        chunk = b"\x00" * frame_size  # HPACK: indexed header field 0 is invalid, but never decoded
        sent = 0
        for client in clients:
            sid, headers = client.headers(f"{SERVER_IP}:8080", end_headers=False)
            try:
                client.send(headers)
                for _ in range(FRAMES):
                    client.send(client.continuation(sid, chunk))
                    sent += len(chunk)
            except OSError:
                pass  # closed by the proxy mid-flood
        peak = proxy.rss_mb()
        goaways = [goaway_of(client, 5) for client in clients]
        for client in clients:
            client.close()
        print(f"CONTINUATION flood: advertised {advertised}, {sent >> 20} MiB sent on {CONNECTIONS} "
              f"connections, RSS {before:.0f} -> {peak:.0f} MiB, GOAWAY codes "
              f"{[g.error_code if g else None for g in goaways]}")
        assert advertised.get(SettingsFrame.MAX_FRAME_SIZE) == 64 << 10
        assert advertised.get(SettingsFrame.MAX_HEADER_LIST_SIZE) == 16 << 10
        assert all(g is not None and g.error_code == ENHANCE_YOUR_CALM for g in goaways), proxy.tail()
        assert peak - before < 60, proxy.tail()
        assert normal_request(proxy, tmp_path / "normal") == 200
    finally:
        proxy.stop()
        backend.close()


def test_a_header_block_that_never_ends_is_closed_after_the_timeout(netns, tmp_path) -> None:
    proxy = Proxy(netns, tmp_path / "proxy", header_timeout=1)
    try:
        client = RawH2(netns, proxy.tls(tmp_path / "slow"))
        client.handshake()
        sid, headers = client.headers(f"{SERVER_IP}:8080", end_headers=False)
        client.send(headers + client.continuation(sid, b"\x00" * 100))  # small, then nothing
        started = time.monotonic()
        goaway = goaway_of(client, 10)
        took = time.monotonic() - started
        print(f"unfinished header block closed after {took:.1f}s")
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM, proxy.tail()
        assert 0.8 < took < 5
        assert "header block not complete within 1s" in proxy.log()
    finally:
        proxy.stop()
