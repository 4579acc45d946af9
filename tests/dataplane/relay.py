"""A minimal transparent proxy for the data plane tests: ztproxy's socket behaviour without TLS.

It runs inside a proxy namespace and listens with IP_TRANSPARENT on the capture ports, as ztproxy does,
so TPROXY hands it connections with their original addresses intact. For every accepted connection it
appends one JSON line to the log (port, original source, original destination) and then:

- ``--mode banner``: answers ``<port> <src> <dst>`` and closes (proves where a packet was captured);
- ``--mode relay``: forwards the bytes like a proxy. Outbound (15001): to a mesh destination
  (``--mesh CIDR``) it opens a connection to ``<dst ip>:15008`` and first sends the line
  ``CONNECT <dst ip:port>`` (HBONE's CONNECT, in plain text); elsewhere it connects to the original
  destination (passthrough). Inbound 15008 reads that line and connects to its target; inbound 15006
  connects to the original destination. Upstream connections keep the client's address as source
  (IP_TRANSPARENT bind), except for sources in ``--own`` (host workloads: their address is the
  node's own, which the proxy cannot speak for, so it uses its own address and the node SNATs it).

Only the standard library: it runs on the nodes' Python like ztproxy.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import selectors
import socket
import sys
import threading
from typing import List, Optional, Tuple

IP_TRANSPARENT = 19
OUTBOUND, PLAINTEXT, HBONE = 15001, 15006, 15008
Addr = Tuple[str, int]


def listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)
    return sock


def connect(dst: Addr, src_ip: Optional[str]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    if src_ip:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((src_ip, 0))
    sock.connect(dst)
    sock.settimeout(None)
    return sock


def pump(a: socket.socket, b: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, b)
    sel.register(b, selectors.EVENT_READ, a)
    open_sides = 2
    try:
        while open_sides:
            for key, _ in sel.select(timeout=30):
                data = key.fileobj.recv(65536)
                if not data:
                    key.data.shutdown(socket.SHUT_WR)
                    sel.unregister(key.fileobj)
                    open_sides -= 1
                else:
                    key.data.sendall(data)
    finally:
        a.close()
        b.close()


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < 512:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


class Relay:
    def __init__(self, args: argparse.Namespace) -> None:
        self.mode = args.mode
        self.log_path = args.log
        self.mesh = [ipaddress.ip_network(c) for c in args.mesh]
        self.own = set(args.own)
        self.lock = threading.Lock()

    def log(self, **record) -> None:
        with self.lock, open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def source_for(self, client_ip: str) -> Optional[str]:
        return None if client_ip in self.own else client_ip

    def handle(self, port: int, conn: socket.socket) -> None:
        src, dst = conn.getpeername(), conn.getsockname()
        try:
            target = dst
            if port == HBONE and self.mode == "relay":
                line = read_line(conn)
                host, _, tport = line.partition(" ")[2].rpartition(":")
                target = (host, int(tport))
            self.log(port=port, src=f"{src[0]}:{src[1]}", dst=f"{dst[0]}:{dst[1]}",
                     target=f"{target[0]}:{target[1]}")
            if self.mode == "banner":
                conn.sendall(f"{port} {src[0]}:{src[1]} {dst[0]}:{dst[1]}\n".encode())
                conn.close()
                return
            upstream = self.upstream(port, src, target)
            pump(conn, upstream)
        except OSError as exc:
            self.log(port=port, src=f"{src[0]}:{src[1]}", dst=f"{dst[0]}:{dst[1]}", error=str(exc))
            conn.close()

    def upstream(self, port: int, src: Addr, target: Addr) -> socket.socket:
        in_mesh = any(ipaddress.ip_address(target[0]) in net for net in self.mesh)
        if port == OUTBOUND and in_mesh:
            sock = connect((target[0], HBONE), self.source_for(src[0]))
            sock.sendall(f"CONNECT {target[0]}:{target[1]}\n".encode())
            return sock
        return connect(target, self.source_for(src[0]))

    def serve(self, ports: List[int]) -> None:
        for port in ports:
            sock = listen(port)
            threading.Thread(target=self.accept_loop, args=(port, sock), daemon=True).start()
        print("ready", flush=True)
        threading.Event().wait()

    def accept_loop(self, port: int, sock: socket.socket) -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=self.handle, args=(port, conn), daemon=True).start()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["banner", "relay"], default="banner")
    parser.add_argument("--log", required=True)
    parser.add_argument("--ports", type=int, nargs="+", default=[OUTBOUND, PLAINTEXT, HBONE])
    parser.add_argument("--mesh", nargs="*", default=[], help="CIDRs of mesh workloads (HBONE to them)")
    parser.add_argument("--own", nargs="*", default=[], help="host workload addresses (never spoofed)")
    Relay(parser.parse_args(argv)).serve(parser.parse_args(argv).ports)


if __name__ == "__main__":
    sys.exit(main())
