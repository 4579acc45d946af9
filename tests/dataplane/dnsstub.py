"""Stand-in for ztproxy's DNS port in the data plane tests: a plain UDP socket on 0.0.0.0:15053, as
ztproxy's own DNS listener is, that answers every datagram with ``proxy-dns``.

Captured DNS reaches it DNATed in the proxy namespace; its answer leaves from the address of the route
back and conntrack must turn it into an answer from the server the client asked. The test clients
connect their UDP socket to that server first, as resolvers do, so an answer from any other address
would never reach them.
"""

from __future__ import annotations

import socket
import sys


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", int(sys.argv[1]) if len(sys.argv) > 1 else 15053))
    print("ready", flush=True)
    while True:
        _data, peer = sock.recvfrom(2048)
        sock.sendto(b"proxy-dns\n", peer)


if __name__ == "__main__":
    main()
