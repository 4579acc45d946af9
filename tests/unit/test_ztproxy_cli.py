"""``ztproxy check`` and ``ztproxy run`` as an operator runs them: exit codes, messages, graceful drain."""

from __future__ import annotations

import datetime
import re
import signal
import socket
import subprocess
import time

import pytest
from pki import now
from proxy_harness import (
    EchoServer,
    H2TunnelClient,
    MeshFiles,
    client_tls_context,
    wait_for_log,
    workload,
    ztproxy_cmd,
    ztproxy_env,
)

pytestmark = pytest.mark.timeout(60)
SERVER_IP = "127.0.0.3"


@pytest.fixture
def files(tmp_path) -> MeshFiles:
    files = MeshFiles(tmp_path / "mesh")
    files.install("default", "server")
    files.write_state([workload("server", SERVER_IP, "node-a"), workload("client", "127.0.0.2", "node-b")])
    return files


def ztproxy(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(ztproxy_cmd(*args), capture_output=True, text=True, env=ztproxy_env(),
                          timeout=timeout)


def test_check_accepts_a_good_setup(files) -> None:
    proc = ztproxy("check", "--config", str(files.write_settings()))
    assert proc.returncode == 0, proc.stderr
    assert "spiffe://cluster.local/ns/default/sa/server: certificate valid until" in proc.stdout
    assert proc.stdout.strip().endswith("ok")


def test_check_reports_a_bad_certificate(files) -> None:
    files.install("default", "server", files.issue("default", "server",
                                                     not_after=now() - datetime.timedelta(hours=2)))
    proc = ztproxy("check", "--config", str(files.write_settings()))
    assert proc.returncode == 2
    assert "identity spiffe://cluster.local/ns/default/sa/server" in proc.stderr and "expired" in proc.stderr


def test_check_reports_a_bad_mesh_state(files) -> None:
    files.state_path.write_text("workloads:\n- {name: x, namespace: d, workloadIps: [300.1.1.1]}\n")
    proc = ztproxy("check", "--config", str(files.write_settings()))
    assert proc.returncode == 2
    assert "workloads[0] (name 'x')" in proc.stderr and "'300.1.1.1'" in proc.stderr


@pytest.mark.parametrize("command", ["run", "check"])
def test_bad_settings_exit_2_naming_the_key(files, command) -> None:
    path = files.write_settings(pool_idle_timeout=-3)
    proc = ztproxy(command, "--config", str(path))
    assert proc.returncode == 2
    assert "settings key 'pool_idle_timeout': -3 is not valid: expected a number of seconds" in proc.stderr


def test_port_in_use_is_a_startup_error(files) -> None:
    busy = socket.socket()
    busy.bind((SERVER_IP, 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        settings = files.write_settings(listen={"inbound": f"{SERVER_IP}:{port}"})
        proc = ztproxy("run", "--config", str(settings))
    finally:
        busy.close()
    assert proc.returncode == 1
    assert f"cannot listen on {SERVER_IP}:{port} (listen.inbound)" in proc.stderr
    assert "another process is listening" in proc.stderr


def _start(files: MeshFiles, tmp_path, **settings):
    log = tmp_path / "run.log"
    path = files.write_settings(listen={"inbound": f"{SERVER_IP}:0"}, **settings)
    with open(log, "w") as out:
        proc = subprocess.Popen(ztproxy_cmd("run", "--config", str(path)), stdout=out,
                                stderr=subprocess.STDOUT, env=ztproxy_env())
    wait_for_log(proc, log, "ztproxy ready")
    port = int(re.search(rf"inbound {re.escape(SERVER_IP)}:(\d+)", log.read_text()).group(1))
    return proc, port, log


def test_sigterm_drains_gracefully(files, tmp_path) -> None:
    echo = EchoServer(SERVER_IP)
    proc, port, log = _start(files, tmp_path, drain_timeout=10)
    try:
        ctx = client_tls_context(files.issue("default", "client"), files.bundle, tmp_path)
        client = H2TunnelClient((SERVER_IP, port), ctx)
        sid = client.connect(f"{SERVER_IP}:{echo.address[1]}")
        assert client.wait_status(sid) == 200
        proc.send_signal(signal.SIGTERM)
        client.wait(lambda: client.goaway is not None)          # GOAWAY announced
        time.sleep(0.3)
        with pytest.raises(OSError):                              # no longer accepting
            socket.create_connection((SERVER_IP, port), timeout=2).close()
        client.send(sid, b"finishing after SIGTERM", end_stream=True)  # the open stream continues
        client.wait(lambda: client.ended.get(sid))
        assert bytes(client.data[sid]) == b"finishing after SIGTERM"
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        echo.close()
    assert "draining: 1 connection(s) open" in log.read_text()
    assert "stopped (clean drain)" in log.read_text()


def test_drain_deadline_closes_what_is_left(files, tmp_path) -> None:
    echo = EchoServer(SERVER_IP)
    proc, port, log = _start(files, tmp_path, drain_timeout=1)
    try:
        ctx = client_tls_context(files.issue("default", "client"), files.bundle, tmp_path)
        client = H2TunnelClient((SERVER_IP, port), ctx)
        sid = client.connect(f"{SERVER_IP}:{echo.address[1]}")
        assert client.wait_status(sid) == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 5
        client.wait(lambda: client.closed or client.ended.get(sid), timeout=5)
    finally:
        proc.kill()
        echo.close()
    assert "drain deadline reached: closing 1 connection(s)" in log.read_text()
