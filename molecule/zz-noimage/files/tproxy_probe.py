#!/usr/bin/env python3
"""Send one real TCP connection through the probe's TPROXY rule and report what the listener saw.

Runs on the node (its own Python, 3.9+, standard library only). A transparent listener (IP_TRANSPARENT)
is opened in the proxy-like namespace, then a client in the peer namespace connects to an address that
exists nowhere; the mangle TPROXY rule must hand that connection to the listener with the original
destination kept as the accepted socket's local address (what ztproxy's port 15001/15006/15008 rely on).
Prints one JSON object; exits non-zero when the connection was not intercepted.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys

CLONE_NEWNET = 0x40000000
IP_TRANSPARENT = 19  # linux/in.h; socket.IP_TRANSPARENT exists only from Python 3.11 on

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into the named network namespace (os.setns is Python 3.12+)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy-netns", required=True)
    parser.add_argument("--client-netns", required=True)
    parser.add_argument("--port", type=int, required=True, help="TPROXY --on-port")
    parser.add_argument("--target", required=True, help="destination the client dials")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    # Sockets stay in the namespace they were created in, so one thread can set up both ends.
    enter_netns(args.proxy_netns)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen(1)
    listener.settimeout(args.timeout)

    enter_netns(args.client_netns)
    client = socket.create_connection((args.target, args.target_port), timeout=args.timeout)
    try:
        accepted, peer = listener.accept()
    except socket.timeout:
        print(json.dumps({"intercepted": False, "error": "the listener accepted nothing"}))
        return 1
    local = accepted.getsockname()
    client.sendall(b"ping")
    payload = accepted.recv(4)
    result = {
        "intercepted": True,
        "original_destination": f"{local[0]}:{local[1]}",
        "client": f"{peer[0]}:{peer[1]}",
        "client_local": "{}:{}".format(*client.getsockname()),
        "payload": payload.decode(),
    }
    accepted.close()
    client.close()
    listener.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
