"""Outbound HBONE: an HTTP/2 client connection in mutual TLS that carries CONNECT streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable, Dict, List, Optional, Set, Tuple

import h2.events
import h2.exceptions

from ztproxy.certs import peer_spiffe_ids, tls_problem
from ztproxy.proxy.copy import StreamPump
from ztproxy.proxy.h2.session import H2Limits, H2Session

log = logging.getLogger("ztproxy.outbound")


class HboneError(Exception):
    """An HBONE connection or stream could not be established."""


class HboneClientSession(H2Session):
    client_side = True

    def __init__(self, limits: H2Limits, expected_identity: str, max_streams: int,
                 on_lost: Optional[Callable[[HboneClientSession], None]] = None) -> None:
        super().__init__(limits)
        self.expected_identity = expected_identity
        self.max_streams = max_streams
        self.on_lost = on_lost
        self.ready: asyncio.Future = asyncio.get_event_loop().create_future()
        self.reserved = 0  # streams open or being opened on this connection
        self._open_streams: Set[int] = set()
        self._responses: Dict[int, asyncio.Future] = {}
        self.idle_handle: Optional[asyncio.TimerHandle] = None

    # -- connection -----------------------------------------------------------------------------------

    def check_peer(self, transport: asyncio.BaseTransport) -> Optional[str]:
        ssl_object = transport.get_extra_info("ssl_object")
        problem = tls_problem(ssl_object)
        if problem is not None:
            return problem
        sans = peer_spiffe_ids(ssl_object)
        if self.expected_identity not in sans:
            return (f"server identity mismatch: expected {self.expected_identity}, "
                    f"certificate has {', '.join(sans) or 'no URI SAN'}")
        return None

    def session_started(self) -> None:
        if not self.ready.done():
            self.ready.set_result(self)

    def session_lost(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(HboneError(reason))
        for future in self._responses.values():
            if not future.done():
                future.set_exception(HboneError(reason))
        self._responses.clear()
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.on_lost is not None:
            self.on_lost(self)

    def connection_failed(self, reason: str) -> None:
        self.closed = True
        self.session_lost(reason)

    def on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        log.info("HBONE peer %s sent GOAWAY (last stream %s): no new streams on this connection",
                 self.peername(), event.last_stream_id)
        for sid, future in list(self._responses.items()):
            if event.last_stream_id is not None and sid > event.last_stream_id and not future.done():
                future.set_exception(HboneError("stream refused by GOAWAY"))
        if not self.pumps and self.reserved == 0:
            self.close()

    def capacity(self) -> int:
        if not self.ready.done():
            return self.max_streams
        return min(self.max_streams, self.conn.remote_settings.max_concurrent_streams)

    def accepts_streams(self) -> bool:
        return (not self.closed and not self.goaway_received and not self.goaway_sent
                and self.reserved < self.capacity())

    # -- streams --------------------------------------------------------------------------------------

    def reserve(self) -> None:
        self.reserved += 1
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None

    def release(self, stream_id: Optional[int] = None) -> None:
        if stream_id is not None:
            if stream_id not in self._open_streams:
                return
            self._open_streams.discard(stream_id)
        self.reserved -= 1
        if self.reserved == 0 and not self.closed:
            self.became_idle()

    def became_idle(self) -> None:
        """No stream left; the pool replaces this to start the idle timer."""

    async def connect_stream(self, authority: str, headers: List[Tuple[str, str]], pump: StreamPump,
                             timeout: float) -> int:
        """Send CONNECT and wait for the response status; a 200 leaves ``pump`` bound to the stream.

        The caller holds a reservation (``reserve``); on anything but 200 it is released here.
        """
        if self.closed or self.goaway_received:
            self.release()
            raise HboneError("HBONE connection closed")
        sid = self.conn.get_next_available_stream_id()
        request = [(":method", "CONNECT"), (":authority", authority)] + headers
        try:
            self.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in request])
        except h2.exceptions.ProtocolError as exc:
            self.release()
            raise HboneError(f"cannot open a stream: {exc}") from None
        self._open_streams.add(sid)
        pump.bind_stream(self, sid)
        future = asyncio.get_event_loop().create_future()
        self._responses[sid] = future
        self.flush()
        try:
            status = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._give_up(sid)
            raise HboneError(f"no response to CONNECT {authority} within {timeout:g}s") from None
        except HboneError:
            self._give_up(sid)
            raise
        finally:
            self._responses.pop(sid, None)
        if status != 200:
            self._give_up(sid)
        return status

    def _give_up(self, sid: int) -> None:
        self.pumps.pop(sid, None)
        if not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
                self.conn.reset_stream(sid)
            self.flush()
        self.release(sid)

    def stream_finished(self, stream_id: int) -> None:
        super().stream_finished(stream_id)
        self.release(stream_id)

    def handle_other_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            future = self._responses.get(event.stream_id)
            status = 0
            for name, value in event.headers:
                if bytes(name) == b":status":
                    status = int(bytes(value))
            if status != 200:
                # The tunnel was refused: its END_STREAM must not reach the client as a clean EOF.
                self.pumps.pop(event.stream_id, None)
            if future is not None and not future.done():
                future.set_result(status)

    def stream_reset(self, stream_id: int, error_code) -> None:
        future = self._responses.get(stream_id)
        if future is not None and not future.done():
            future.set_exception(HboneError(f"CONNECT stream reset by the peer ({error_code!r})"))
