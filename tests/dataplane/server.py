"""Workload server of the data plane tests: answers every TCP connection and UDP datagram with one line
``<name> peer=<ip:port> local=<ip:port>`` (who it is, and whom it saw), so a test knows where its packet
arrived and with which source address.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from typing import List, Optional


def tcp(name: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)
    while True:
        conn, peer = sock.accept()
        local = conn.getsockname()
        with conn:
            conn.sendall(f"{name} peer={peer[0]}:{peer[1]} local={local[0]}:{local[1]}\n".encode())


def udp(name: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        _data, peer = sock.recvfrom(2048)
        sock.sendto(f"{name} peer={peer[0]}:{peer[1]} local=udp:{port}\n".encode(), peer)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, nargs="*", default=[])
    parser.add_argument("--udp", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    for kind, ports in ((tcp, args.tcp), (udp, args.udp)):
        for port in ports:
            threading.Thread(target=kind, args=(args.name, port), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
