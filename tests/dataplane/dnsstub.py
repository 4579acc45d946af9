"""Stand-in for ztproxy's DNS port in the data plane tests: a transparent UDP socket on 15053 that answers
every datagram with ``proxy-dns <original destination>`` (read with IP_RECVORIGDSTADDR, as a TPROXY
UDP server must).
"""

from __future__ import annotations

import socket
import struct
import sys

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    sock.bind(("0.0.0.0", int(sys.argv[1]) if len(sys.argv) > 1 else 15053))
    print("ready", flush=True)
    while True:
        _data, ancillary, _flags, peer = sock.recvmsg(2048, socket.CMSG_SPACE(16))
        dst = "?"
        for level, kind, value in ancillary:
            if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR:
                port, raw = struct.unpack("!2xH4s8x", value[:16])
                dst = f"{socket.inet_ntoa(raw)}:{port}"
        sock.sendto(f"proxy-dns {dst}\n".encode(), peer)


if __name__ == "__main__":
    main()
