"""HTTP/2 framing for bulk payload without copies, underneath h2's state machine.

h2 keeps all of HTTP/2's state (streams, flow control, settings, HPACK); only the two places where it
copies every payload byte are replaced:

- Sending: h2 serializes each DATA frame by concatenating header, padding and payload, appends that to
  a ``bytearray`` and hands it out as a new ``bytes``: four copies of every byte before TLS sees it.
  ``ZeroCopyH2Connection`` emits a DATA frame of ``ZERO_COPY_MIN`` bytes or more as two pieces, the
  9-byte header and the caller's own buffer, kept in order with everything else h2 writes;
  ``take_output()`` returns the pieces for ``transport.writelines``.
- Receiving: h2's FrameBuffer appends every read to a ``bytearray`` and copies each frame's body out of
  it twice. ``FrameReader`` is a drop-in FrameBuffer whose memory the TLS layer decrypts straight into
  (``get_buffer``/``commit``, the asyncio BufferedProtocol calls) and whose DATA frames carry a
  ``memoryview`` of that memory as payload. A region that was handed out is never written again: when
  the buffer is full a new one is started, so payload views stay valid as long as anyone holds them.

The wire format is unchanged (tests compare it byte for byte with h2's own serialization), and frames
are validated as h2 validates them: only the copies are gone.
"""

from __future__ import annotations

import binascii
import struct
from typing import Callable, List, Optional, Union

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.frame_buffer
import hpack
import hyperframe.frame
from hyperframe.exceptions import InvalidDataError, InvalidFrameError, InvalidPaddingError
from hyperframe.frame import DataFrame, Frame

Buffer = Union[bytes, bytearray, memoryview]

# Payloads smaller than this are copied into h2's output buffer as usual: for them a separate piece
# (and TLS record) costs more than the copy.
ZERO_COPY_MIN = 16 * 1024
# The receive buffer: a new one is started when less than READ_MIN bytes (or less than the rest of the
# frame being received) are free. Bigger buffers mean fewer frames straddling two of them (a straddling
# frame's received part is copied once into the next buffer), but every connection holds one: 1 MiB
# made 1,000 idle connections cost 1 GB (issue 13). A buffer starts at RECV_BUFFER_SIZE and is made
# larger only for a frame that does not fit, which the advertised SETTINGS_MAX_FRAME_SIZE bounds.
RECV_BUFFER_SIZE = 64 * 1024
READ_MIN = 16 * 1024

_HEADER = struct.Struct(">HBBBL")  # HTTP/2 frame header: 24-bit length as 16 + 8 bits, type, flags, id
_DATA_TYPE = 0x0
_END_STREAM = 0x1


def _short_hex(data: Buffer) -> str:
    """hyperframe's ``_raw_data_repr`` with the same output, hexlifying only what it shows.

    h2 formats ``repr(frame)`` for every received frame (even with logging off) and hyperframe's
    version hexlifies the whole payload before cutting it to 20 characters."""
    if not data:
        return "None"
    text = binascii.hexlify(bytes(data[:11])).decode("ascii")
    return "<hex:" + (text[:20] + "..." if len(text) > 20 else text) + ">"


def _data_body_repr(frame: DataFrame) -> str:
    """DataFrame's repr body without ``serialize_body()``, which copies the whole payload (and turns a
    memoryview payload into bytes) only to show its first bytes. Same text for unpadded frames."""
    return _short_hex(frame.data)


hyperframe.frame._raw_data_repr = _short_hex
DataFrame._body_repr = _data_body_repr


def data_frame_header(length: int, end_stream: bool, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, _DATA_TYPE, _END_STREAM if end_stream else 0,
                        stream_id & 0x7FFFFFFF)


class LiteralHpackEncoder(hpack.Encoder):
    """HPACK without Huffman coding of literals: hpack's Huffman coder is a Python loop over every byte,
    and ztproxy's headers (a fresh ``traceparent`` per stream) are mostly literals. RFC 7541 lets each
    string be sent either way; the header block is ~20 % larger, which is nothing next to the CPU."""

    def encode(self, headers, huffman: bool = True) -> bytes:  # type: ignore[override]
        return super().encode(headers, huffman=False)


class ZeroCopyH2Connection(h2.connection.H2Connection):
    """An H2Connection whose large DATA payloads reach the transport as the caller's own buffers.

    Also: a HEADERS frame that would open one stream more than SETTINGS_MAX_CONCURRENT_STREAMS allows
    refuses that stream (RST_STREAM REFUSED_STREAM, RFC 9113 section 5.1.2) instead of h2's
    TooManyStreamsError, which closes the whole connection with every stream on it."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._pieces: List[Buffer] = []  # output older than what h2 holds in _data_to_send
        self.incoming_buffer = FrameReader(server=not config.client_side)
        # h2 copies max_inbound_frame_size into the reader once per receive_data() call, so a frame
        # that follows the SETTINGS ACK raising the limit in the same read was checked against the old
        # limit (a protocol error for a correct peer). The reader asks the connection instead.
        self.incoming_buffer.frame_size_source = lambda: self.max_inbound_frame_size
        self.refused_streams = 0  # streams refused for being over the limit (for logs and tests)
        # Replaced before any SETTINGS exchange, so the table size h2 applies later reaches this one.
        self.encoder = LiteralHpackEncoder()

    def _receive_headers_frame(self, frame: hyperframe.frame.HeadersFrame):  # type: ignore[override]
        peer_initiated = (frame.stream_id % 2 == 1) != self.config.client_side
        if (frame.stream_id not in self.streams and peer_initiated
                and frame.stream_id > self.highest_inbound_stream_id
                and self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams):
            # Decode the block all the same: HPACK state is per connection, skipping it would corrupt
            # every later header block. The decoder's size limit applies here too.
            h2.connection._decode_headers(self.decoder, frame.data)
            self.highest_inbound_stream_id = frame.stream_id
            self.refused_streams += 1
            reset = hyperframe.frame.RstStreamFrame(frame.stream_id)
            reset.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
            return [reset], []
        return super()._receive_headers_frame(frame)

    def _prepare_for_sending(self, frames: List[Frame]) -> None:
        for frame in frames:
            data = getattr(frame, "data", None)
            if (type(frame) is DataFrame and "PADDED" not in frame.flags and data is not None
                    and len(data) >= ZERO_COPY_MIN):
                length = len(data)
                self._data_to_send += data_frame_header(length, "END_STREAM" in frame.flags, frame.stream_id)
                self._pieces.append(bytes(self._data_to_send))
                self._pieces.append(data)
                self._data_to_send = bytearray()
                frame.body_len = length
            else:
                self._data_to_send += frame.serialize()
            # h2's own check (send_data has already refused an oversized payload).
            assert frame.body_len <= self.max_outbound_frame_size

    def take_output(self) -> List[Buffer]:
        """Everything queued for the wire, in order, as buffers for ``transport.writelines``."""
        pieces = self._pieces
        if self._data_to_send:
            pieces.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        self._pieces = []
        return pieces

    def data_to_send(self, amount: Optional[int] = None) -> bytes:
        """h2's API, for callers that want one ``bytes`` (joins the pieces: a copy)."""
        data = b"".join(self.take_output())
        if amount is None or amount >= len(data):
            return data
        self._data_to_send = bytearray(data[amount:])
        return data[:amount]

    def clear_outbound_data_buffer(self) -> None:
        self._pieces = []
        super().clear_outbound_data_buffer()


class FrameReader(h2.frame_buffer.FrameBuffer):
    """h2's FrameBuffer, filled in place by the transport, yielding DATA payloads as memoryviews."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        # Bound on the bytes of one header block (HEADERS + CONTINUATION frames, still compressed); 0
        # means h2's own limits only (64 frames of max_frame_size). The session sets it.
        self.max_header_block = 0
        self._header_block_bytes = 0
        self.frame_size_source: Optional[Callable[[], int]] = None
        self._buf = bytearray(0)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # end of the bytes received
        self._missing = 0  # bytes still to come for the frame at _start (0: unknown)

    # -- filling -------------------------------------------------------------------------------------

    def get_buffer(self, size_hint: int = -1) -> memoryview:
        """Writable memory right after the received bytes (asyncio BufferedProtocol.get_buffer).

        ``size_hint`` is ignored: asyncio's and uvloop's TLS ask for 256 KiB on every read, which would
        make every connection hold that much; the frame being received decides instead."""
        return self._room(max(READ_MIN, self._missing))

    def _room(self, want: int) -> memoryview:
        if len(self._buf) - self._end < want:
            self._new_buffer(want)
        return self._view[self._end:]

    def commit(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last get_buffer() (BufferedProtocol.buffer_updated)."""
        self._end += nbytes

    def add_data(self, data: Buffer) -> None:
        """h2's FrameBuffer API: append ``data`` (one copy, into the receive buffer)."""
        n = len(data)
        if n:
            target = self._room(max(READ_MIN, self._missing, n))
            target[:n] = data
            self.commit(n)

    def _new_buffer(self, want: int) -> None:
        """Start a new buffer holding the unparsed tail; the old one stays intact for its views."""
        tail = self._end - self._start
        buf = bytearray(max(RECV_BUFFER_SIZE, tail + want))
        buf[:tail] = self._view[self._start:self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, tail

    @property  # type: ignore[override]
    def max_frame_size(self) -> int:
        if self.frame_size_source is not None:
            return self.frame_size_source()
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._max_frame_size = value

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def in_header_block(self) -> bool:
        """A HEADERS frame arrived whose CONTINUATION frames have not all come yet."""
        return bool(self._headers_buffer)

    def _update_header_buffer(self, f: Optional[Frame]) -> Optional[Frame]:
        limit = self.max_header_block
        if limit and isinstance(f, (hyperframe.frame.HeadersFrame, hyperframe.frame.PushPromiseFrame,
                                    hyperframe.frame.ContinuationFrame)):
            if not isinstance(f, hyperframe.frame.ContinuationFrame) or not self._headers_buffer:
                self._header_block_bytes = 0
            self._header_block_bytes += len(f.data)
            if self._header_block_bytes > limit:
                # ENHANCE_YOUR_CALM: the GOAWAY says why (a CONTINUATION flood held 700 MB, issue 13).
                raise h2.exceptions.DenialOfServiceError(
                    f"header block larger than {limit} bytes")
        return super()._update_header_buffer(f)

    # -- parsing (the iterator protocol h2 uses) --------------------------------------------------------

    def __next__(self) -> Frame:
        while True:
            if self._preamble_len:
                self._consume_preamble()
            start, available = self._start, self._end - self._start
            if available < 9:
                self._missing = 9 - available
                raise StopIteration
            view = self._view
            try:
                frame, length = Frame.parse_frame_header(view[start:start + 9])
            except (InvalidDataError, InvalidFrameError) as err:
                raise h2.exceptions.ProtocolError(f"Received frame with invalid header: {err!s}") from err
            # Checked as soon as the header is known, so an oversized frame is never buffered.
            self._validate_frame_length(length)
            if available < 9 + length:
                self._missing = 9 + length - available
                raise StopIteration
            self._missing = 0
            body = view[start + 9:start + 9 + length]
            self._start = start + 9 + length
            if type(frame) is DataFrame and "PADDED" not in frame.flags:
                frame.data = body  # the payload itself, no copy
                frame.body_len = length
            else:
                try:
                    frame.parse_body(body)
                except InvalidDataError as err:
                    raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from err
                except InvalidPaddingError as err:
                    # Not an InvalidDataError: h2's own FrameBuffer lets it escape receive_data(), which
                    # the session does not expect (found by tests/fuzz). A protocol error: GOAWAY.
                    raise h2.exceptions.ProtocolError("Received frame with invalid padding") from err
                except InvalidFrameError as err:
                    raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from err
            frame = self._update_header_buffer(frame)
            if frame is not None:
                return frame

    def _consume_preamble(self) -> None:
        available = self._end - self._start
        n = min(self._preamble_len, available)
        if self._preamble[:n] != self._view[self._start:self._start + n]:
            raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
        self._start += n
        self._preamble = self._preamble[n:]
        self._preamble_len -= n
        if self._preamble_len:
            self._missing = self._preamble_len
            raise StopIteration
