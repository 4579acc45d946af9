"""Opening the proxy's own TCP connections to targets (inbound) and to destinations outside the mesh."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, Optional, Tuple

from ztproxy.config import Settings
from ztproxy.proxy.origdst import outgoing_socket

log = logging.getLogger("ztproxy.upstream")
_warned_transparent = False


async def connect_upstream(settings: Settings, dst: Tuple[str, int], client_ip: Optional[str],
                           protocol_factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport:
    """Connect to ``dst``; with ``preserve_source`` the socket speaks as ``client_ip`` (IP_TRANSPARENT).

    Raises OSError (including a timeout) when the connection cannot be made.
    """
    global _warned_transparent
    source = (client_ip, 0) if settings.preserve_source and client_ip else None
    try:
        sock = outgoing_socket(dst[0], settings.socket_mark, source)
    except OSError as exc:
        if source is None:
            raise
        # Without CAP_NET_ADMIN (or the address family differs) the source cannot be kept: connect as
        # the proxy rather than refusing the connection, and say so once.
        if not _warned_transparent:
            log.warning("cannot bind to the client address %s (IP_TRANSPARENT: %s); connecting from the "
                        "proxy's own address instead", client_ip, exc)
            _warned_transparent = True
        sock = outgoing_socket(dst[0], settings.socket_mark, None)
    loop = asyncio.get_event_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, dst), settings.connect_timeout)
    except asyncio.TimeoutError:
        sock.close()
        raise OSError(f"connect to {dst[0]}:{dst[1]} timed out after {settings.connect_timeout:g}s") from None
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    transport, _ = await loop.create_connection(protocol_factory, sock=sock)
    return transport  # type: ignore[return-value]


async def adopt(sock: socket.socket, protocol: asyncio.Protocol) -> asyncio.Transport:
    """Build the transport of an accepted socket once its protocol is known."""
    transport, _ = await asyncio.get_event_loop().connect_accepted_socket(lambda: protocol, sock)
    return transport  # type: ignore[return-value]
