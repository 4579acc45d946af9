"""HBONE connection pool: CONNECT streams multiplexed per (source identity, destination identity,
destination address), at most ``pool_max_streams`` per connection (ztunnel's
POOL_MAX_STREAMS_PER_CONNECTION, 100), connections released after ``pool_idle_timeout`` unused.

The source identity's certificate generation is part of the key: after a renewal new streams go to a
new connection with the new certificate while the old connection finishes its streams and idles out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine, Dict, List, Optional, Tuple

from ztproxy.certs import CertError, CertStore
from ztproxy.config import Settings
from ztproxy.proxy.h2.client import HboneClientSession, HboneError
from ztproxy.proxy.h2.session import H2Limits
from ztproxy.proxy.origdst import outgoing_socket

log = logging.getLogger("ztproxy.pool")

# (source identity, its certificate generation, destination identity, destination address, source
# address the connection speaks from or "" for the proxy's own): as ztunnel's WorkloadKey, connections
# are not shared between source addresses, since the destination takes the source from the connection.
PoolKey = Tuple[str, int, str, Tuple[str, int], str]
_warned_transparent = False


Spawn = Callable[[Coroutine[Any, Any, Any]], Any]


class HbonePool:
    def __init__(self, settings: Settings, certs: CertStore, limits: H2Limits, spawn: Spawn) -> None:
        self.settings = settings
        self.certs = certs
        self.limits = limits
        self.spawn = spawn
        self._sessions: Dict[PoolKey, List[HboneClientSession]] = {}

    def sessions(self) -> List[HboneClientSession]:
        return [s for group in self._sessions.values() for s in group]

    async def acquire(self, src_identity: str, dst_identity: str, dst_addr: Tuple[str, int],
                      src_ip: Optional[str] = None) -> HboneClientSession:
        """A connected session with a stream reserved for the caller (release via the session).

        With ``src_ip`` and ``preserve_source`` the connection speaks from the source workload's address
        (IP_TRANSPARENT): the destination proxy takes the client address from the connection, never
        from a header the client could write."""
        try:
            contexts = self.certs.get(src_identity)
        except CertError as exc:
            raise HboneError(f"no usable certificate for {src_identity}: {exc}") from None
        source = src_ip if src_ip and self.settings.preserve_source else ""
        key: PoolKey = (src_identity, contexts.generation, dst_identity, dst_addr, source)
        group = self._sessions.setdefault(key, [])
        for session in group:
            if session.accepts_streams():
                return await self._claim(session)
        session = self._new_session(key)
        group.append(session)
        session.reserve()
        self.spawn(self._connect(session, contexts.client, dst_addr, source or None))
        return await self._claim(session, reserved=True)

    @staticmethod
    async def _claim(session: HboneClientSession, reserved: bool = False) -> HboneClientSession:
        """Reserve a stream on the session and wait until it is connected; a failed connect gives the
        reservation back before the error goes to the caller."""
        if not reserved:
            session.reserve()
        try:
            await session.ready
        except HboneError:
            session.release()
            raise
        return session

    def _new_session(self, key: PoolKey) -> HboneClientSession:
        settings = self.settings

        def lost(session: HboneClientSession) -> None:
            group = self._sessions.get(key)
            if group is not None and session in group:
                group.remove(session)
                if not group:
                    del self._sessions[key]

        session = HboneClientSession(self.limits, key[2], settings.pool_max_streams, on_lost=lost)

        def idle() -> None:
            loop = asyncio.get_event_loop()
            session.idle_handle = loop.call_later(settings.pool_idle_timeout, self._release_idle, session)

        session.became_idle = idle  # type: ignore[method-assign]
        return session

    @staticmethod
    def _release_idle(session: HboneClientSession) -> None:
        if session.reserved == 0 and not session.closed:
            log.debug("releasing idle HBONE connection to %s", session.peername())
            session.goaway()
            session.close()

    async def _connect(self, session: HboneClientSession, ssl_context, dst_addr: Tuple[str, int],
                       src_ip: Optional[str] = None) -> None:
        global _warned_transparent
        settings = self.settings
        loop = asyncio.get_event_loop()
        try:
            try:
                sock = outgoing_socket(dst_addr[0], settings.socket_mark, (src_ip, 0) if src_ip else None)
            except OSError as exc:
                if src_ip is None:
                    raise
                # As upstream.connect_upstream: without CAP_NET_ADMIN speak as the proxy, say so once.
                if not _warned_transparent:
                    log.warning("cannot bind HBONE to the source address %s (IP_TRANSPARENT: %s); "
                                "connecting from the proxy's own address instead", src_ip, exc)
                    _warned_transparent = True
                sock = outgoing_socket(dst_addr[0], settings.socket_mark)
        except OSError as exc:
            session.connection_failed(f"cannot create a socket: {exc}")
            return
        try:
            await asyncio.wait_for(loop.sock_connect(sock, dst_addr), settings.connect_timeout)
            # server_hostname: an IP sends no SNI; the identity is checked on the URI SAN instead.
            await loop.create_connection(lambda: session, sock=sock, ssl=ssl_context,
                                         server_hostname=dst_addr[0],
                                         ssl_handshake_timeout=settings.tls_handshake_timeout)
        except asyncio.TimeoutError:
            sock.close()
            session.connection_failed(f"HBONE connect to {dst_addr[0]}:{dst_addr[1]} timed out")
        except (OSError, ConnectionError) as exc:
            sock.close()
            session.connection_failed(f"HBONE connect to {dst_addr[0]}:{dst_addr[1]} failed: {exc}")
        else:
            if session.close_reason is not None and not session.ready.done():
                session.connection_failed(session.close_reason)
