"""A node's own resolver for the DNS exposure test: answers every query (UDP and TCP) with a large TXT
record set (about 3.7 kB), as the public names used for amplification do. Prints 'ready' once bound.

Usage: bigdns.py IP PORT
"""

from __future__ import annotations

import socket
import struct
import sys
import threading

import dns.message
import dns.rrset

CHUNK = "x" * 250


def answer(wire: bytes) -> bytes:
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    name = query.question[0].name
    texts = [f'"{i:02d}{CHUNK}"' for i in range(14)]
    response.answer.append(dns.rrset.from_text_list(name, 60, "IN", "TXT", texts))
    return response.to_wire(max_size=65535)


def serve_tcp(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            try:
                (length,) = struct.unpack("!H", conn.recv(2))
                data = b""
                while len(data) < length:
                    data += conn.recv(length - len(data))
                out = answer(data)
                conn.sendall(struct.pack("!H", len(out)) + out)
            except (OSError, struct.error):
                pass


def main() -> None:
    ip, port = sys.argv[1], int(sys.argv[2])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((ip, port))
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((ip, port))
    tcp.listen(16)
    threading.Thread(target=serve_tcp, args=(tcp,), daemon=True).start()
    print("ready", flush=True)
    while True:
        data, peer = udp.recvfrom(4096)
        udp.sendto(answer(data), peer)


if __name__ == "__main__":
    main()
