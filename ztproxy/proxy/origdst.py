"""Socket options of transparent proxying: original destination, IP_TRANSPARENT, SO_MARK."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Optional, Tuple

# <linux/netfilter_ipv4.h>, <linux/netfilter_ipv6/ip6_tables.h>, <linux/in.h>
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def _so_original_dst(sock: socket.socket) -> Optional[Tuple[str, int]]:
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return socket.inet_ntop(socket.AF_INET, packed), port
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    except OSError:
        # ENOENT: no conntrack NAT entry (TPROXY or a direct connection).
        return None


def original_destination(sock: socket.socket) -> Tuple[str, int]:
    """Where the client meant to connect.

    REDIRECT rewrites the destination and conntrack remembers the original (SO_ORIGINAL_DST); TPROXY
    keeps it, so the accepted socket's own local address is the original destination. Conntrack
    answers with the unchanged address for connections it did not NAT, so asking it first is right for
    both, and the local address is the answer when there is no conntrack entry at all.
    """
    found = _so_original_dst(sock)
    if found is not None:
        return found
    local = sock.getsockname()
    return local[0], local[1]


def listening_socket(address: Tuple[str, int], transparent: bool, backlog: int = 4096) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; IP_TRANSPARENT for TPROXY when asked."""
    host, port = address
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def outgoing_socket(dst_ip: str, mark: int, source: Optional[Tuple[str, int]] = None) -> socket.socket:
    """A non-blocking TCP socket for the proxy's own upstream connection.

    ``mark`` (SO_MARK) lets the node's rules recognise the proxy's traffic and never capture it again.
    ``source`` binds the socket to the original client's address with IP_TRANSPARENT so the target sees
    the real client (port 0: any free port; the client's own port may still be in use by the client).
    """
    family = _family(dst_ip)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source is not None and _family(source[0]) == family:
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind((source[0], 0))
    except OSError:
        sock.close()
        raise
    return sock
