"""Accept loops. Each accepted socket goes to its handler as a plain socket, before any transport
exists: the handler reads the original destination from it, chooses the route or the TLS certificate,
and only then builds the asyncio transport. (A transport created at accept time would start reading at
once on Python < 3.12, even when paused in connection_made, and bytes such as a TLS ClientHello could
reach the wrong protocol.)"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from typing import Awaitable, Callable, Optional, Tuple

log = logging.getLogger("ztproxy.listener")

Handler = Callable[[socket.socket, Tuple], Awaitable[None]]


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST, so the client sees a refused connection rather than a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Listener:
    def __init__(self, name: str, sock: socket.socket, handler: Handler, spawn) -> None:
        self.name = name
        self.sock = sock
        self.handler = handler
        self.spawn = spawn
        self._task: Optional[asyncio.Task] = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_event_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_event_loop()
        while not self._closed:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                return
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("%s listener: cannot accept (%s); retrying shortly", self.name, exc.strerror)
                    await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.spawn(self.handler(conn, peer))

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self.sock.close()
