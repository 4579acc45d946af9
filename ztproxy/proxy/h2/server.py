"""The server side of an HTTP/2 connection (ztunnel's h2/server.rs): what every HBONE server connection
does whatever its requests ask for.

- The client's preface and first SETTINGS must arrive within ``preface_timeout``: a TLS connection that
  never speaks HTTP/2 would otherwise hold its buffers (and a per-peer slot) forever.
- A connection with no stream for ``idle_timeout`` is closed (GOAWAY NO_ERROR).
- After a GOAWAY, streams the peer opens beyond the last one announced are refused (REFUSED_STREAM).

Each request goes to ``handle_request`` (ztproxy.proxy.inbound answers HBONE CONNECTs there).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import h2.errors
import h2.events
import h2.exceptions

from ztproxy.proxy.h2.session import H2Limits, H2Session

log = logging.getLogger("ztproxy.inbound")


class H2ServerSession(H2Session):
    client_side = False

    def __init__(self, limits: H2Limits, preface_timeout: float, idle_timeout: float) -> None:
        super().__init__(limits)
        self.preface_timeout = preface_timeout
        self.idle_timeout = idle_timeout
        self._last_stream_before_goaway: Optional[int] = None
        self._settings_received = False
        self._preface_timer: Optional[asyncio.TimerHandle] = None
        self._idle_timer: Optional[asyncio.TimerHandle] = None
        self._idle_since = 0.0

    def session_started(self) -> None:
        loop = asyncio.get_event_loop()
        self._preface_timer = loop.call_later(self.preface_timeout, self._preface_timed_out)
        self._idle_since = loop.time()
        self._idle_timer = loop.call_later(self.idle_timeout, self._check_idle)

    def session_lost(self, reason: str) -> None:
        for timer in (self._preface_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._preface_timer = self._idle_timer = None

    def _preface_timed_out(self) -> None:
        self._preface_timer = None
        if not self._settings_received:
            self.protocol_violation(f"no HTTP/2 preface and SETTINGS within {self.preface_timeout:g}s",
                                    h2.errors.ErrorCodes.SETTINGS_TIMEOUT)

    def _check_idle(self) -> None:
        """Close a connection that has had no stream for idle_timeout (GOAWAY NO_ERROR)."""
        self._idle_timer = None
        if self.closed:
            return
        loop = asyncio.get_event_loop()
        timeout = self.idle_timeout
        if self.pumps or self.conn.open_inbound_streams:
            self._idle_since = loop.time()
        elif loop.time() - self._idle_since >= timeout:
            log.info("closing HBONE connection with %s: no stream for %gs", self.peername(), timeout)
            self.close_reason = f"idle for {timeout:g}s"
            self.goaway()
            self.close()
            return
        self._idle_timer = loop.call_at(self._idle_since + timeout, self._check_idle)

    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_received = True
        super().handle_event(event)

    def goaway(self) -> None:
        self._last_stream_before_goaway = self.conn.highest_inbound_stream_id
        super().goaway()

    def handle_other_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            last = self._last_stream_before_goaway
            if last is not None and event.stream_id > last:
                self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            self.handle_request(event)

    def handle_request(self, event: h2.events.RequestReceived) -> None:
        """A request on a new stream; subclasses answer it (``respond``)."""
        self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)

    def respond(self, stream_id: int, status: int, end: bool) -> None:
        """Send the response headers (``:status`` only); ``end`` ends the stream with them."""
        try:
            self.conn.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()
