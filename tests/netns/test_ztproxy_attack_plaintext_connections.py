"""Many plaintext connections from one source (issue 13, per-peer cap on port 15006) against a real
``ztproxy run``: a client outside the mesh opens connections to a workload, captured to the inbound
plaintext listener (15006) as on a node, and never closes them. Without a cap each one held a relay, an
upstream connection to the workload and two of the proxy's file descriptors, so one address could take
every descriptor and starve all other clients. Now one source address holds at most
``max_plaintext_connections_per_peer`` of them; the next is reset at accept, before any upstream
connection, while other sources are still served.

Capture: a nat OUTPUT REDIRECT in the test's namespace sends connections to the workload's port to
15006 (the proxy reads the original destination from conntrack), except the proxy's own upstream
connections, which carry its socket mark (as the node's rules exempt them).
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import List, Optional

import pytest
from attack_harness import BACKEND_PORT, SERVER_IP, Backend, Proxy, in_netns

pytestmark = pytest.mark.timeout(180)

CAP = 20
ATTACK = 60  # three times the cap, from one address
ATTACKER_IP, OTHER_IP = "127.0.0.5", "127.0.0.6"  # neither is a workload: clients outside the mesh
MARK = 0x539  # the proxy's socket_mark (default), set explicitly below


def _capture(sh, netns: str) -> None:
    sh("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", SERVER_IP, "--dport", str(BACKEND_PORT),
       "-m", "mark", "!", "--mark", hex(MARK), "-j", "REDIRECT", "--to-ports", "15006", netns=netns)


def _open(netns: str, source_ip: str) -> socket.socket:
    with in_netns(netns):
        return socket.create_connection((SERVER_IP, BACKEND_PORT), timeout=10, source_address=(source_ip, 0))


def _echoes(sock: socket.socket) -> bool:
    """True when bytes sent come back through the proxy from the echo backend; False when the proxy
    reset or closed the connection instead."""
    try:
        sock.sendall(b"ping")
        received = b""
        while len(received) < 4:
            chunk = sock.recv(4 - len(received))
            if not chunk:
                return False
            received += chunk
        return received == b"ping"
    except OSError:  # ECONNRESET: refused at accept
        return False


def _served_then_held(netns: str, source_ip: str, count: int) -> List[Optional[socket.socket]]:
    """Open ``count`` connections from ``source_ip`` one after the other and keep the served ones open
    (None for a refused one)."""
    held: List[Optional[socket.socket]] = []
    for _ in range(count):
        try:
            sock = _open(netns, source_ip)
        except OSError:
            held.append(None)
            continue
        if _echoes(sock):
            held.append(sock)
        else:
            sock.close()
            held.append(None)
    return held


def test_one_source_cannot_hold_more_plaintext_connections_than_its_cap(netns, sh, tmp_path) -> None:
    backend = Backend(netns, SERVER_IP)
    _capture(sh, netns)
    proxy = Proxy(netns, tmp_path / "proxy", socket_mark=MARK, max_plaintext_connections_per_peer=CAP,
                  listen={"inbound_plaintext": "0.0.0.0:15006"})
    held: List[Optional[socket.socket]] = []
    try:
        held = _served_then_held(netns, ATTACKER_IP, ATTACK)
        served = sum(1 for sock in held if sock is not None)
        upstream = backend.accepted
        other = _open(netns, OTHER_IP)
        other_served = _echoes(other)
        other.close()
        print(f"{ATTACK} plaintext connections from one address: {served} served, {ATTACK - served} "
              f"refused, {upstream} upstream connections; another address served: {other_served}")
        assert served == CAP, proxy.tail()
        assert upstream == CAP, "a refused connection must not reach the workload"
        refused = f"inbound plaintext from {ATTACKER_IP} refused: it already has {CAP} connections"
        assert refused in proxy.log()
        assert other_served, proxy.tail()
        # The slots come back when the connections end: the attacker's address is served again.
        for sock in held:
            if sock is not None:
                sock.close()
        held = []
        deadline = time.monotonic() + 10
        again = False
        while not again and time.monotonic() < deadline:
            sock = _open(netns, ATTACKER_IP)
            again = _echoes(sock)
            sock.close()
            if not again:
                time.sleep(0.2)  # the proxy sees the closes on its own schedule
        assert again, proxy.tail()
    finally:
        for sock in held:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        proxy.stop()
        backend.close()
