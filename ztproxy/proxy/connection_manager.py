"""What the proxy keeps of the connections it serves, for graceful drain (ztunnel's connection manager):
the proxied connections (pumps and relays) still open, the tasks that handle them, the inbound HBONE
sessions and the per-peer counts of inbound connections: HBONE (``max_connections_per_peer``) and
plaintext (``max_plaintext_connections_per_peer``)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Callable, Coroutine, Dict, List, Optional, Set

from ztproxy.hooks import Failure
from ztproxy.proxy.h2.session import H2Session
from ztproxy.proxy.listener import reset

log = logging.getLogger("ztproxy")
inbound_log = logging.getLogger("ztproxy.inbound")


class PeerCounter:
    """Connections open per source address on one kind of listener, against a cap.

    A connection counts from its accept until the release its admission returned is called (once is
    enough; later calls do nothing), so the cap holds whatever state the connection is in."""

    def __init__(self) -> None:
        self.counts: Dict[str, int] = {}

    def admit(self, address: str, cap: int) -> Optional[Callable[[], None]]:
        """Count one more connection from ``address``; None when it already has ``cap``."""
        if self.counts.get(address, 0) >= cap:
            return None
        self.counts[address] = self.counts.get(address, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.counts.get(address, 1) - 1
            if left > 0:
                self.counts[address] = left
            else:
                self.counts.pop(address, None)  # no entry per address ever seen: the map stays small

        return release

    def admit_or_reset(self, sock: socket.socket, address: str, cap: int, listener: str,
                       setting: str) -> Optional[Callable[[], None]]:
        """admit(), and when ``address`` is at its cap, log the refusal (naming the setting that
        sets the cap) and reset ``sock``; the caller then drops the connection (None returned)."""
        release = self.admit(address, cap)
        if release is None:
            inbound_log.warning("inbound %s from %s refused: it already has %d connections (%s)",
                                listener, address, cap, setting)
            reset(sock)
        return release


class ConnectionManager:
    def __init__(self) -> None:
        # Inbound connections per peer address: HBONE (TLS handshakes included) and plaintext (15006).
        self.hbone_peers = PeerCounter()
        self.plaintext_peers = PeerCounter()
        self.server_sessions: Set[H2Session] = set()
        self._active: Set[Any] = set()
        self._tasks: Set[asyncio.Task] = set()

    @property
    def active(self) -> List[Any]:
        """The proxied connections still open."""
        return list(self._active)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run a connection handler as a task the drain cancels; a crash in it is logged."""
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in a connection handler", exc_info=task.exception())

    def track(self, connection: Any) -> None:
        """Count a proxied connection (pump or relay) as active until it finishes (for drain)."""
        self._active.add(connection)
        previous = connection.on_done

        def done(failure: Optional[Failure]) -> None:
            self._active.discard(connection)
            if previous is not None:
                previous(failure)

        connection.on_done = done

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
