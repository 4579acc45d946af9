"""One HTTP/2 connection over TLS (the ``h2`` state machine driven by an asyncio protocol).

The session feeds received bytes to h2, dispatches stream events to the stream's handler (a
``StreamHandler``: the byte pump of ztproxy.proxy.copy), and writes what h2 wants sent. It implements
the pump's ``StreamCarrier`` protocol (bind, send_capacity, send_data, send_end, reset, acknowledge,
flush, stream_finished, write_paused) and imports nothing of the pump. The client session
(ztproxy.proxy.h2.client) and the server session (ztproxy.proxy.inbound) add request handling.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Deque, Dict, Optional, Protocol, Tuple

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ztproxy import config
from ztproxy.proxy.h2.frames import Buffer, ZeroCopyH2Connection

log = logging.getLogger("ztproxy.h2")


class StreamHandler(Protocol):
    """What the session calls on the handler of one stream (ztproxy.proxy.copy.StreamPump)."""

    def on_h2_data(self, data: Buffer, flow_controlled_length: int) -> None: ...

    def on_h2_end(self) -> None: ...

    def on_h2_reset(self, error: str) -> None: ...

    def on_window(self) -> None: ...

    def on_session_lost(self, error: str) -> None: ...

    def update_reading(self) -> None: ...


class _DrainableStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's connection state machine, except that GOAWAY does not close the connection.

    h2 moves to CLOSED on sending or receiving GOAWAY and then rejects every frame, which would cut
    the streams in flight. RFC 9113 section 6.8 lets streams up to the GOAWAY's last stream id finish,
    which graceful drain needs; the sessions themselves refuse new streams after a GOAWAY.
    """

    _transitions = dict(h2.connection.H2ConnectionStateMachine._transitions)
    _open_states = (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN)
    _goaway = (h2.connection.ConnectionInputs.SEND_GOAWAY, h2.connection.ConnectionInputs.RECV_GOAWAY)
    for _state in _open_states:
        for _input in _goaway:
            _transitions[(_state, _input)] = (None, _state)
    del _state, _input, _open_states, _goaway


class H2Limits:
    """The HTTP/2 sizes this side advertises and the limits it holds a peer to (from Settings; the
    defaults are config.py's)."""

    def __init__(self, max_frame_size: int, stream_window: int, connection_window: int,
                 max_concurrent_streams: int,
                 max_header_list_size: int = config.DEFAULT_MAX_HEADER_LIST_SIZE,
                 header_timeout: float = config.DEFAULT_HEADER_TIMEOUT,
                 max_stream_resets: int = config.DEFAULT_MAX_STREAM_RESETS,
                 write_buffer: int = config.DEFAULT_CONNECTION_WRITE_BUFFER) -> None:
        self.max_frame_size = max_frame_size
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_size = max_header_list_size
        self.header_timeout = header_timeout
        self.max_stream_resets = max_stream_resets
        self.write_buffer = write_buffer

    @classmethod
    def from_settings(cls, settings: config.Settings) -> H2Limits:
        return cls(settings.max_frame_size, settings.stream_window, settings.connection_window,
                   settings.pool_max_streams, max_header_list_size=settings.max_header_list_size,
                   header_timeout=settings.header_timeout, max_stream_resets=settings.max_stream_resets,
                   write_buffer=settings.connection_write_buffer)


def _h2_version() -> Tuple[int, int]:
    try:
        major, minor = h2.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


# h2 releases before 4.4 (4.4 needs Python 3.10, so Python 3.9 nodes get an older one) demand :path
# and :scheme in every request, which an RFC 9113 section 8.5 CONNECT (HBONE's) never carries. With
# those, a server turns off h2's inbound header validation; proxy.inbound checks the CONNECT itself
# (method, :authority, pseudo-headers) and answers 400 to a malformed one.
H2_VALIDATES_CONNECT = _h2_version() >= (4, 4)


class H2Session(asyncio.BufferedProtocol):
    """An HTTP/2 connection; a BufferedProtocol so TLS decrypts straight into the frame reader."""

    client_side = False

    def __init__(self, limits: H2Limits) -> None:
        # Outbound header validation and normalization are off: ztproxy builds every header it sends
        # itself (lowercase names, no connection headers), and h2's checks were a tenth of the CPU of
        # opening a stream. What peers send is still validated.
        config = h2.config.H2Configuration(client_side=self.client_side, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False,
                                           validate_inbound_headers=self.client_side
                                           or H2_VALIDATES_CONNECT)
        self.conn = ZeroCopyH2Connection(config=config)
        self.conn.state_machine = _DrainableStateMachine()
        self.limits = limits
        # Header blocks: bounded in bytes as they arrive (compressed) and once decoded (h2's decoder
        # limit, which SETTINGS_MAX_HEADER_LIST_SIZE below also announces), and in time (_header_timer).
        self.conn.incoming_buffer.max_header_block = limits.max_header_list_size
        self.conn.decoder.max_header_list_size = limits.max_header_list_size
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._resets: Deque[float] = collections.deque()  # when the peer reset a stream, for the budget
        self.transport: Optional[asyncio.Transport] = None
        self.pumps: Dict[int, StreamHandler] = {}
        self.write_paused = False  # the streams stop reading TCP: _loop_paused or _backlogged
        self._loop_paused = False
        self._backlogged = False
        self.closed = False
        self.goaway_received = False
        self.goaway_sent = False
        self._started = False
        self.close_reason: Optional[str] = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Pause the streams' TCP reads only when a good amount waits for the socket: the stream and
        # connection windows already bound what can pile up here.
        transport.set_write_buffer_limits(high=self.limits.write_buffer,  # type: ignore[attr-defined]
                                          low=self.limits.write_buffer // 4)
        problem = self.check_peer(transport)
        if problem is not None:
            log.warning("closing HBONE connection with %s: %s", transport.get_extra_info("peername"),
                        problem)
            self.close_reason = problem
            transport.abort()
            return
        self._started = True
        self.conn.initiate_connection()
        # A second SETTINGS frame, as h2 intends: each value takes effect on our side only once the
        # peer acknowledges it, so both ends always agree on frame size and windows.
        settings = {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: self.limits.max_frame_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.limits.stream_window,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_list_size,
        }
        if self.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.conn.update_settings(settings)
        extra = self.limits.connection_window - self.conn.inbound_flow_control_window
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self.flush()
        self.session_started()
        if self.conn.incoming_buffer.buffered:
            self._receive()

    def check_peer(self, transport: asyncio.BaseTransport) -> Optional[str]:
        """Subclasses verify the TLS peer here; a returned reason aborts the connection."""
        return None

    def session_started(self) -> None:
        pass

    def flush(self) -> None:
        pieces = self.conn.take_output()
        transport = self.transport
        if pieces and transport is not None and not transport.is_closing():
            # Large DATA payloads are separate pieces (no copy); TLS encrypts each in turn.
            transport.writelines(pieces)
            # Back-pressure must not depend on the event loop calling pause_writing() in time: with
            # uvloop's TLS under CPU contention it came late or not at all and a reader that never
            # read made the proxy buffer gigabytes (issue 13). The streams look at the buffer size
            # themselves (tls_backlogged) before reading their TCP sockets again.
            if not self._backlogged and self.tls_backlogged():
                self._backlogged = True
                self.write_paused = True
                self._poll_write_buffer()

    def tls_backlogged(self) -> bool:
        """More than the write buffer limit waits in the TLS transport (encrypted or not)."""
        transport = self.transport
        if transport is None:
            return False
        try:
            size = transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):
            return False
        return size > self.limits.write_buffer

    def _poll_write_buffer(self) -> None:
        """Resume the streams once the transport drained below the low mark, whether or not the loop
        calls resume_writing() (it does not when it never called pause_writing())."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() <= self.limits.write_buffer // 4:
            self._backlogged = False
            self._update_write_paused()
            return
        asyncio.get_event_loop().call_later(0.01, self._poll_write_buffer)

    # -- receiving: the transport fills the frame reader's memory (BufferedProtocol) -----------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.incoming_buffer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.incoming_buffer.commit(nbytes)
        if self._started:  # bytes that come before the session starts wait in the reader
            self._receive()

    def data_received(self, data: bytes) -> None:
        """For transports that do not fill buffers themselves (and for tests)."""
        self.conn.incoming_buffer.add_data(data)
        if self._started:
            self._receive()

    def _receive(self) -> None:
        try:
            events = self.conn.receive_data(b"")
        except h2.exceptions.ProtocolError as exc:
            # str(exc), never exc itself, in every record a peer can cause: a handler that keeps records
            # (a queue under load, a test's log capture) would otherwise pin the exception, its traceback
            # and through the frames the whole closed connection, about 400 KiB each (issue 13 fuzz run).
            log.warning("HTTP/2 protocol error from %s: %s", self.peername(), str(exc))
            self.flush()  # h2 queued a GOAWAY
            self.close_reason = f"HTTP/2 protocol error: {exc}"
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self.handle_event(event)
        self.flush()
        self._watch_header_block()

    def _watch_header_block(self) -> None:
        """A header block must complete within header_timeout: a peer that sends HEADERS without
        END_HEADERS and then trickles (or never sends) CONTINUATION frames is closed."""
        if self.conn.incoming_buffer.in_header_block:
            if self._header_timer is None and not self.closed:
                self._header_timer = asyncio.get_event_loop().call_later(
                    self.limits.header_timeout, self._header_block_timed_out)
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_block_timed_out(self) -> None:
        self._header_timer = None
        self.protocol_violation(f"header block not complete within {self.limits.header_timeout:g}s",
                                h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def protocol_violation(self, why: str, code: h2.errors.ErrorCodes) -> None:
        """Close the connection with GOAWAY ``code``: the peer abused the protocol (every stream on it
        ends; the peer's other connections are not affected)."""
        if self.closed or self.transport is None:
            return
        log.warning("closing HTTP/2 connection with %s: %s", self.peername(), why)
        self.close_reason = f"HTTP/2 connection closed: {why}"
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(code)
        self.flush()
        self.transport.close()

    def pause_writing(self) -> None:
        self._loop_paused = True
        self._update_write_paused()

    def resume_writing(self) -> None:
        self._loop_paused = False
        self._update_write_paused()

    def _update_write_paused(self) -> None:
        """Streams read their TCP sockets only while neither the event loop (pause_writing) nor our own
        look at the buffer (flush) says the TLS connection is backlogged."""
        paused = self._loop_paused or self._backlogged
        if paused == self.write_paused:
            return
        self.write_paused = paused
        for pump in list(self.pumps.values()):
            pump.update_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        reason = self.close_reason or (f"HBONE connection lost: {exc}" if exc else "HBONE connection closed")
        for pump in list(self.pumps.values()):
            pump.on_session_lost(reason)
        self.pumps.clear()
        self.session_lost(reason)

    def session_lost(self, reason: str) -> None:
        pass

    def peername(self):
        return self.transport.get_extra_info("peername") if self.transport else None

    # -- events ---------------------------------------------------------------------------------------

    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            pump = self.pumps.get(event.stream_id)
            if pump is not None:
                pump.on_h2_data(event.data, event.flow_controlled_length)
            else:
                # Data for a stream we no longer track: give the connection window back.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            pump = self.pumps.get(event.stream_id)
            if pump is not None:
                pump.on_h2_end()
        elif isinstance(event, h2.events.StreamReset):
            pump = self.pumps.get(event.stream_id)
            self.stream_reset(event.stream_id, event.error_code)
            if pump is not None:
                pump.on_h2_reset(f"stream reset by peer ({event.error_code!r})")
            if event.remote_reset:
                self._count_reset()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for pump in list(self.pumps.values()):
                    pump.on_window()
            else:
                pump = self.pumps.get(event.stream_id)
                if pump is not None:
                    pump.on_window()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for pump in list(self.pumps.values()):
                    pump.on_window()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_received = True
            self.on_goaway(event)
        else:
            self.handle_other_event(event)

    def _count_reset(self) -> None:
        """The reset budget (CVE-2023-44487, "rapid reset"): a peer that resets more than
        max_stream_resets streams within STREAM_RESET_WINDOW seconds loses the connection. Each reset
        stream may have cost an upstream connect; legitimate clients reset rarely."""
        now = time.monotonic()
        resets = self._resets
        resets.append(now)
        while resets and now - resets[0] > config.STREAM_RESET_WINDOW:
            resets.popleft()
        if len(resets) > self.limits.max_stream_resets:
            self.protocol_violation(f"more than {self.limits.max_stream_resets} streams reset within "
                                    f"{config.STREAM_RESET_WINDOW:g}s",
                                    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def handle_other_event(self, event: h2.events.Event) -> None:
        pass

    def stream_reset(self, stream_id: int, error_code) -> None:
        pass

    def on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        pass

    # -- the StreamCarrier protocol of ztproxy.proxy.copy ---------------------------------------------

    def bind(self, stream_id: int, pump: StreamHandler) -> None:
        self.pumps[stream_id] = pump

    def send_capacity(self, stream_id: int) -> int:
        try:
            window = self.conn.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return -1
        return min(window, self.conn.max_outbound_frame_size)

    def send_data(self, stream_id: int, data: Buffer) -> bool:
        try:
            self.conn.send_data(stream_id, data)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        return True

    def send_end(self, stream_id: int) -> bool:
        try:
            self.conn.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        return True

    def reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(stream_id, code)
        self.flush()

    def acknowledge(self, stream_id: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return
        self.flush()

    def stream_finished(self, stream_id: int) -> None:
        """A pump is done with its stream (both directions ended, or reset)."""
        self.pumps.pop(stream_id, None)

    def goaway(self) -> None:
        """Tell the peer no new streams will be accepted (graceful drain)."""
        if self.closed or self.transport is None or not self._started:
            return
        if self.goaway_sent:
            return
        self.goaway_sent = True
        try:
            self.conn.close_connection()
        except h2.exceptions.ProtocolError:
            return
        self.flush()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
