"""The byte pumps (ztunnel's copy.rs): the only code that moves payload, and the boundary a C data path
will plug into.

``StreamPump`` joins one TCP socket to one HTTP/2 stream, ``TcpRelay`` joins two TCP sockets. Neither
touches individual bytes: payload moves as the chunks the event loop reads (up to 256 KiB) and as
HTTP/2 frames.

The boundary. This module imports nothing of the HTTP/2 code. What a ``StreamPump`` needs of the
connection that carries its stream is the ``StreamCarrier`` protocol below (eight calls: bind, send
capacity, send data, send end, reset, acknowledge, flush, finished, and one flag, ``write_paused``);
``ztproxy.proxy.h2.session.H2Session`` implements it. In the other direction the carrier calls the
pump's ``on_h2_data``, ``on_h2_end``, ``on_h2_reset``, ``on_window``, ``on_session_lost`` and
``update_reading`` (``ztproxy.proxy.h2.session.StreamHandler``). The pump reports the end of the
connection once, to its ``ConnTracker`` (ztproxy.hooks), and to ``on_done``, with None or a typed
``Failure`` (ztproxy.hooks.Reason: why, as a value). Nothing else crosses.

Flow control never buffers without bound and never deadlocks:
- TCP -> HTTP/2: data is read from the TCP socket only while the stream has send window and the TLS
  connection's write buffer is not full; what does not fit waits (one read's worth at most) and reading
  pauses until a WINDOW_UPDATE arrives.
- HTTP/2 -> TCP: received DATA is acknowledged (the window reopened) only once the TCP socket has taken
  it: the TCP transport's write-buffer limits are zero, so any unsent byte pauses acknowledgement until
  the socket drains. A slow reader therefore stalls the sender through HTTP/2 flow control, and the data
  held per stream is bounded by the stream window.
Half-close travels both ways: TCP EOF -> END_STREAM, END_STREAM -> shutdown(SHUT_WR).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING, Callable, Deque, List, Optional, Protocol

from ztproxy.hooks import Failure, Reason

if TYPE_CHECKING:  # pragma: no cover
    from ztproxy.hooks import ConnTracker

log = logging.getLogger("ztproxy.copy")

_LINGER_RESET = struct.pack("ii", 1, 0)

# HTTP/2 error codes (RFC 9113 section 7) a pump resets its stream with.
CANCEL = 0x8
CONNECT_ERROR = 0xA

DoneCallback = Callable[[Optional[Failure]], None]


class StreamCarrier(Protocol):
    """What a StreamPump needs of the multiplexed connection that carries its stream (HTTP/2 here).

    Calls on a stream that the connection no longer knows (closed, reset) are ignored by the carrier,
    which reports that through the return values where the pump must react."""

    @property
    def write_paused(self) -> bool:
        """The connection's own write buffer is full: pumps stop reading their TCP sockets."""
        ...

    def bind(self, stream_id: int, pump: StreamPump) -> None:
        """Deliver the stream's events to ``pump`` from now on."""
        ...

    def send_capacity(self, stream_id: int) -> int:
        """How many bytes may be sent on the stream now, as one DATA frame (0: wait for on_window;
        negative: the stream is gone)."""
        ...

    def send_data(self, stream_id: int, data: memoryview) -> bool:
        """Queue ``data`` (at most send_capacity bytes) on the stream; False when the stream is gone."""
        ...

    def send_end(self, stream_id: int) -> bool:
        """Half-close the stream (END_STREAM); False when the stream is gone."""
        ...

    def reset(self, stream_id: int, code: int) -> None:
        """Reset the stream with the HTTP/2 error ``code`` and flush."""
        ...

    def acknowledge(self, stream_id: int, n: int) -> None:
        """``n`` received bytes were delivered: reopen the peer's send window by that much, and flush."""
        ...

    def flush(self) -> None:
        """Write out what was queued."""
        ...

    def stream_finished(self, stream_id: int) -> None:
        """The pump is done with the stream (both directions ended, or reset)."""
        ...


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Close ``transport`` with a TCP RST. ``transport.abort()`` alone closes the socket, which the
    kernel ends with a FIN when no received byte is unread: the application would take a truncated
    transfer for a complete one (issue 13). SO_LINGER with a zero timeout makes the close a reset."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class StreamPump(asyncio.Protocol):
    """The asyncio protocol of a TCP socket whose bytes ride on one HTTP/2 stream."""

    def __init__(self, tracker: ConnTracker, tcp_is_client: bool,
                 on_done: Optional[DoneCallback] = None) -> None:
        self.tracker = tracker
        # Istio's counters: "received" = from the connection's client, "sent" = towards it.
        self._count_tcp_in = tracker.add_received if tcp_is_client else tracker.add_sent
        self._count_h2_in = tracker.add_sent if tcp_is_client else tracker.add_received
        self.on_done = on_done
        self.session: Optional[StreamCarrier] = None
        self.stream_id = 0
        self.tcp: Optional[asyncio.Transport] = None
        self._transport: Optional[asyncio.BaseTransport] = None
        self._pending: Deque[memoryview] = collections.deque()  # TCP bytes waiting for HTTP/2 window
        self._early: List[bytes] = []  # HTTP/2 data that arrived before the TCP side was connected
        self._unacked = 0
        self._tcp_write_blocked = False
        self._tcp_eof = False
        self._end_sent = False
        self._end_received = False
        self._early_end = False
        self._active = False  # stream established: TCP bytes may flow onto it
        self._finished = False
        # The upstream connect of an inbound stream: cancelled when the stream ends before it is done
        # (a reset stream must not leave a backend connection behind: rapid reset, issue 13).
        self.connect_task: Optional[asyncio.Task] = None

    # -- binding -------------------------------------------------------------------------------------

    def bind_stream(self, session: StreamCarrier, stream_id: int) -> None:
        """Receive the stream's events (data may be buffered until the TCP side is attached)."""
        self.session = session
        self.stream_id = stream_id
        session.bind(stream_id, self)

    def attach_tcp(self, transport: asyncio.Transport) -> None:
        """Use ``transport`` (whose protocol is this pump) as the TCP side; reading stays paused."""
        self.tcp = transport
        # Zero limits: pause_writing() fires as soon as anything is buffered, resume_writing() when the
        # socket took everything; acknowledgements follow that (see module docstring).
        transport.set_write_buffer_limits(high=0, low=0)
        # Paused here, not in connection_made: by now the loop has started reading (see there), so this
        # pause sticks and is_reading() tells the truth from now on.
        transport.pause_reading()
        for chunk in self._early:
            transport.write(chunk)
        self._early.clear()
        if self._early_end:
            self._write_eof()
        self._ack()

    def start(self) -> None:
        """The stream is established: let bytes flow both ways."""
        self._active = True
        self._update_reading()
        self._send_pending()

    # -- TCP side (asyncio.Protocol) ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No pause here: neither loop honours one made in connection_made. uvloop starts reading right
        # after connection_made returns; asyncio before 3.12 adds its reader anyway and then ignores
        # pause_reading() (it believes it is paused). The transport then read while the pump thought it
        # paused, and a stream started on a backlogged TLS connection read its upstream at full speed
        # into the proxy's memory (issue 13, slow reader: 0.5 GB in seconds). attach_tcp pauses instead,
        # and data_received below holds anything read before that.
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._count_tcp_in(len(data))
        self._pending.append(memoryview(data))
        if not self._active:
            # Read before the stream is up: hold it (one read at most) and stop until start().
            self._transport.pause_reading()  # type: ignore[union-attr]
            return
        self._send_pending()

    def eof_received(self) -> bool:
        self._tcp_eof = True
        self._send_pending()
        return True  # keep our write side open: the other direction may still be flowing

    def pause_writing(self) -> None:
        self._tcp_write_blocked = True

    def resume_writing(self) -> None:
        self._tcp_write_blocked = False
        self._ack()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._finished:
            return
        if self._end_sent and self._end_received:
            self._finish(None)
            return
        # The TCP peer went away (RST or our abort) before both directions ended: reset the stream.
        self._reset_stream(CONNECT_ERROR)
        self._finish(Failure(Reason.CONNECTION_LOST,
                             f"tcp connection lost: {exc}" if exc else "tcp connection closed early"))

    # -- HTTP/2 side (called by the session) ----------------------------------------------------------

    def on_h2_data(self, data: bytes, flow_controlled_length: int) -> None:
        self._count_h2_in(len(data))
        self._unacked += flow_controlled_length
        if self.tcp is None:
            self._early.append(data)
            return
        if self.tcp.is_closing():
            self._ack(force=True)
            return
        self.tcp.write(data)
        self._ack()

    def on_h2_end(self) -> None:
        self._end_received = True
        if self.tcp is None:
            self._early_end = True
            return
        self._write_eof()
        self._maybe_close()

    def on_h2_reset(self, error: str) -> None:
        """The peer reset the stream; ``error`` describes it."""
        self._end_received = self._end_sent = True
        if self.tcp is not None:
            abort_with_reset(self.tcp)
        self._finish(Failure(Reason.STREAM_RESET, error))

    def on_window(self) -> None:
        self._send_pending()

    def cancel(self, failure: Failure) -> None:
        """Give up on an established stream whose TCP side never came up: reset it, finish."""
        self._reset_stream(CANCEL)
        self._finish(failure)

    def on_session_lost(self, error: str) -> None:
        """The HTTP/2 connection is gone: abort the TCP side (RST), so the client sees an error."""
        self.abort(Failure(Reason.CONNECTION_LOST, error))

    def abort(self, failure: Failure) -> None:
        """End the connection now: abort the TCP side (RST), so the client sees an error."""
        if self._finished:
            return
        if self.tcp is not None:
            abort_with_reset(self.tcp)
        self._finish(failure)

    def update_reading(self) -> None:
        self._update_reading()

    @property
    def finished(self) -> bool:
        return self._finished

    # -- internals ------------------------------------------------------------------------------------

    def _ack(self, force: bool = False) -> None:
        if not self._unacked or (self._tcp_write_blocked and not force) or self.session is None:
            return
        n, self._unacked = self._unacked, 0
        self.session.acknowledge(self.stream_id, n)

    def _send_pending(self) -> None:
        session = self.session
        if session is None or not self._active or self._end_sent:
            return
        sid = self.stream_id
        pending = self._pending
        gone = False
        while pending:
            window = session.send_capacity(sid)
            if window <= 0:
                gone = window < 0
                break
            chunk = pending[0]
            n = min(window, len(chunk))
            # Usually a whole read becomes one frame; the frame layer passes the buffer on without a copy.
            if n == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[n:]
                chunk = chunk[:n]
            if not session.send_data(sid, chunk):
                gone = True
                break
        if not gone and not pending and self._tcp_eof:
            if session.send_end(sid):
                self._end_sent = True
            else:
                gone = True
        if gone:
            log.debug("stream %d: send failed: the stream is closed", sid)
            pending.clear()
        session.flush()
        self._update_reading()
        self._maybe_close()

    def _update_reading(self) -> None:
        tcp = self.tcp
        if tcp is None or tcp.is_closing():
            return
        want = (self._active and not self._pending and not self._tcp_eof
                and self.session is not None and not self.session.write_paused)
        # The transport's own state, never a copy of it: a flag of ours drifted from the loop's (see
        # connection_made) and a stream then never paused its upstream.
        reading = tcp.is_reading()
        if want and not reading:
            tcp.resume_reading()
        elif not want and reading:
            tcp.pause_reading()

    def _write_eof(self) -> None:
        tcp = self.tcp
        if tcp is not None and not tcp.is_closing() and tcp.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                tcp.write_eof()

    def _maybe_close(self) -> None:
        if self._end_sent and self._end_received and self.tcp is not None and not self._finished:
            self.tcp.close()  # flushes what is buffered, then closes
            self._finish(None)

    def _reset_stream(self, code: int) -> None:
        if self.session is not None:
            self.session.reset(self.stream_id, code)

    def _finish(self, failure: Optional[Failure]) -> None:
        if self._finished:
            return
        self._finished = True
        self._pending.clear()
        task, self.connect_task = self.connect_task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self.session is not None:
            self.session.stream_finished(self.stream_id)
        self.tracker.closed(failure)
        if self.on_done is not None:
            self.on_done(failure)


class _RelaySide(asyncio.Protocol):
    """One socket of a TcpRelay; holds what it reads until the relay starts (see connection_made)."""

    def __init__(self, relay: TcpRelay, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.transport: Optional[asyncio.Transport] = None
        self.peer: Optional[_RelaySide] = None
        self.held: List[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)  # type: ignore[attr-defined]
        # No pause here (StreamPump.connection_made says why it would not stick): data_received holds
        # the first read and pauses until the relay starts.

    def data_received(self, data: bytes) -> None:
        if self.is_client:
            self.relay.tracker.add_received(len(data))
        else:
            self.relay.tracker.add_sent(len(data))
        if not self.relay.started:
            self.held.append(data)
            self.transport.pause_reading()
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.relay.started:
            self._forward_eof()
        return True

    def _forward_eof(self) -> None:
        peer = self.peer.transport
        if peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()
        if self.peer.eof:
            self.relay.close(None)

    def flush_held(self) -> None:
        for chunk in self.held:
            self.peer.transport.write(chunk)
        self.held.clear()
        if self.eof:
            self._forward_eof()
        elif not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.relay.started and not self.peer.eof and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True
        if self.eof and self.peer.eof:
            self.relay.close(None)
        else:
            self.relay.abort(Failure(Reason.CONNECTION_LOST,
                                     f"connection lost: {exc}" if exc else "connection closed early"))


class TcpRelay:
    """Plain TCP to plain TCP (passthrough and inbound plaintext), with back-pressure both ways.

    Build both transports with ``client`` and ``server`` as their protocols, then call ``start``."""

    def __init__(self, tracker: ConnTracker, on_done: Optional[DoneCallback] = None) -> None:
        self.tracker = tracker
        self.on_done = on_done
        self.client = _RelaySide(self, True)
        self.server = _RelaySide(self, False)
        self.client.peer, self.server.peer = self.server, self.client
        self.started = False
        self._closed = False

    def start(self) -> None:
        if self._closed:
            return
        self.started = True
        self.client.flush_held()
        self.server.flush_held()

    def abort(self, failure: Failure) -> None:
        """End both sides now with a TCP RST."""
        self.close(failure, abort=True)

    def close(self, failure: Optional[Failure], abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        for side in (self.client, self.server):
            if side.transport is not None:
                if abort:
                    abort_with_reset(side.transport)
                else:
                    side.transport.close()
        self.tracker.closed(failure)
        if self.on_done is not None:
            self.on_done(failure)
