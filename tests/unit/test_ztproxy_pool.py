"""The HBONE connection pool against a real ztproxy inbound listener (TLS + HTTP/2 on loopback)."""

from __future__ import annotations

import asyncio
import time

import pytest
from proxy_harness import MeshFiles, ProxyThread, workload

from ztproxy.proxy.h2.client import HboneError

pytestmark = pytest.mark.timeout(60)
SERVER_IP = "127.0.0.3"


@pytest.fixture
def files(tmp_path) -> MeshFiles:
    files = MeshFiles(tmp_path / "mesh")
    files.install("default", "server")
    files.install("default", "client")
    files.write_state([workload("server", SERVER_IP, "node-a"), workload("client", "127.0.0.2", "node-a")])
    return files


def _acquire(app: ProxyThread, files: MeshFiles, dst_identity: str):
    future = asyncio.run_coroutine_threadsafe(
        app.proxy.pool.acquire(files.identity("default", "client"), dst_identity,
                             (SERVER_IP, app.port("inbound"))), app.loop)
    return future.result(15)


def test_streams_per_connection_limit_and_idle_release(files) -> None:
    with ProxyThread(files.settings(pool_max_streams=2, pool_idle_timeout=0.5)) as app:
        server_id = files.identity("default", "server")
        first = _acquire(app, files, server_id)
        second = _acquire(app, files, server_id)
        third = _acquire(app, files, server_id)
        assert first is second and third is not first  # at most 2 streams per connection
        assert first.reserved == 2 and third.reserved == 1
        app.call(first.release)
        assert _acquire(app, files, server_id) is first  # a free slot is reused
        for _ in range(2):
            app.call(first.release)
        app.call(third.release)
        deadline = time.monotonic() + 5
        while not (first.closed and third.closed):
            assert time.monotonic() < deadline, "idle connections were not released"
            time.sleep(0.05)
        assert app.call(app.proxy.pool.sessions) == []


def test_wrong_server_identity_is_refused(files) -> None:
    with ProxyThread(files.settings()) as app:
        with pytest.raises(HboneError, match="server identity mismatch"):
            _acquire(app, files, files.identity("default", "someone-else"))
        assert app.call(app.proxy.pool.sessions) == []
