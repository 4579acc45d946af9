"""ztproxy.proxy.h2.frames against stock h2: the zero-copy framing must put the same frames on the wire and
read whatever a stock h2 peer writes, however the bytes are cut into reads."""

from __future__ import annotations

import random
from typing import List, Tuple

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from ztproxy.proxy.h2 import frames as h2frames
from ztproxy.proxy.h2.frames import FrameReader, ZeroCopyH2Connection

BIG = 1 << 20


# h2 before 4.4 (what Python 3.9 gets) rejects an RFC 9113 CONNECT without :path: validation is off there.
_MODERN_H2 = tuple(int(x) for x in h2.__version__.split(".")[:2]) >= (4, 4)


def _config(client: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client, header_encoding=None,
                                     validate_outbound_headers=_MODERN_H2,
                                     validate_inbound_headers=_MODERN_H2)


def _stock(client: bool) -> h2.connection.H2Connection:
    return h2.connection.H2Connection(config=_config(client))


def _handshake(client, server) -> None:
    """Open both ends, allow 1 MiB frames and large windows, exchange until quiet."""
    client.initiate_connection()
    server.initiate_connection()
    for conn in (client, server):
        conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: BIG,
                              h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
        conn.increment_flow_control_window(1 << 30)
    _exchange(client, server)


def _exchange(a, b) -> List[h2.events.Event]:
    events: List[h2.events.Event] = []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return events
        if out_a:
            events += b.receive_data(out_a)
        if out_b:
            a.receive_data(out_b)


def _payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("size", [1, 100, h2frames.ZERO_COPY_MIN - 1, h2frames.ZERO_COPY_MIN, 300_000, BIG])
@pytest.mark.parametrize("end_stream", [False, True])
def test_data_frames_are_byte_identical_to_h2(size: int, end_stream: bool) -> None:
    outputs = []
    for factory in (_stock, ZeroCopyH2Connection):
        client = factory(True) if factory is _stock else factory(_config(True))
        server = _stock(False)
        _handshake(client, server)
        client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
        _exchange(client, server)
        client.send_data(1, _payload(7, seed=2))
        client.send_data(1, memoryview(_payload(size)), end_stream=end_stream)
        outputs.append(client.data_to_send())
    assert outputs[0] == outputs[1]


def test_take_output_keeps_order_and_passes_payload_through() -> None:
    client, server = ZeroCopyH2Connection(_config(True)), _stock(False)
    _handshake(client, server)
    client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
    payload = _payload(200_000)
    client.send_data(1, payload)
    client.ping(b"12345678")
    pieces = client.take_output()
    assert any(piece is payload for piece in pieces), "the payload object itself must reach the transport"
    events = server.receive_data(b"".join(pieces))
    kinds = [type(e) for e in events]
    assert kinds == [h2.events.RequestReceived, h2.events.DataReceived, h2.events.PingReceived]
    assert events[1].data == payload
    assert client.take_output() == []


def _sent_by_stock_client(chunks: List[Tuple[int, bytes, bool, int]]) -> Tuple[bytes, bytes]:
    """Wire bytes of a stock client: preamble and settings, then HEADERS and DATA frames."""
    client, server = _stock(True), _stock(False)
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
    client.increment_flow_control_window(1 << 30)
    # The receiver's SETTINGS (1 MiB frames, big windows) as the servers below send them; the
    # opening bytes end with the client's ACKs. (h2 applies an acknowledged frame size from the next
    # receive_data call on, so the opening is fed on its own.)
    server.initiate_connection()
    server.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: BIG,
                            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
    server.increment_flow_control_window(1 << 30)
    client.receive_data(server.data_to_send())
    opening = client.data_to_send()
    streams = set()
    for sid, data, end, pad in chunks:
        if sid not in streams:
            client.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"),
                                      (b"x-long", b"v" * 20000)])  # several CONTINUATION frames
            streams.add(sid)
        client.send_data(sid, data, end_stream=end, pad_length=pad or None)
    return opening, client.data_to_send()


def _zero_copy_server(stock: bool = False) -> h2.connection.H2Connection:
    server = _stock(False) if stock else ZeroCopyH2Connection(_config(False))
    server.initiate_connection()
    server.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: BIG,
                            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
    server.increment_flow_control_window(1 << 30)
    return server


def _summary(events) -> List[Tuple]:
    out = []
    for e in events:
        if isinstance(e, h2.events.DataReceived):
            out.append(("data", e.stream_id, bytes(e.data), e.flow_controlled_length))
        elif isinstance(e, h2.events.RequestReceived):
            out.append(("request", e.stream_id, tuple((bytes(k), bytes(v)) for k, v in e.headers)))
        else:
            out.append((type(e).__name__, getattr(e, "stream_id", None)))
    return out


@pytest.mark.parametrize("cut", ["whole", "bytewise-start", "random", "buffered"])
def test_reader_yields_what_stock_h2_yields(cut: str) -> None:
    frames = [(1, _payload(300_000, 3), False, 0), (3, _payload(50, 4), False, 9),
              (1, _payload(BIG, 5), True, 0), (3, _payload(70_000, 6), True, 200)]
    opening, wire = _sent_by_stock_client(frames)

    reference = _zero_copy_server(stock=True)
    reference.receive_data(opening)
    expected = _summary(reference.receive_data(wire))

    server = _zero_copy_server()
    server.receive_data(opening)
    rng = random.Random(7)
    events: List[h2.events.Event] = []
    pos = 0
    while pos < len(wire):
        if cut == "whole":
            n = len(wire)
        elif cut == "bytewise-start":
            n = 1 if pos < 200 else len(wire)
        else:
            n = rng.choice([1, 9, 10, 1000, 16384, 65536, 300_000])
        n = min(n, len(wire) - pos)
        if cut == "buffered":  # the transport writes into the reader's own memory
            target = server.incoming_buffer.get_buffer(n)
            n = min(n, len(target))
            target[:n] = wire[pos:pos + n]
            server.incoming_buffer.commit(n)
            events += server.receive_data(b"")
        else:
            events += server.receive_data(wire[pos:pos + n])
        pos += n
    assert _summary(events) == expected
    assert [e for e in events if isinstance(e, h2.events.DataReceived)], "no data arrived"


def test_payload_views_stay_valid_across_buffers() -> None:
    frames = [(1, _payload(200_000, seed), False, 0) for seed in range(12)]
    opening, body = _sent_by_stock_client(frames)
    server = _zero_copy_server()
    server.receive_data(opening)
    views = []
    wire = body
    for pos in range(0, len(wire), 100_000):
        for event in server.receive_data(wire[pos:pos + 100_000]):
            if isinstance(event, h2.events.DataReceived):
                assert isinstance(event.data, memoryview)
                views.append(event.data)
    # 2.4 MB went through several 1 MiB buffers; every earlier payload is still intact.
    assert b"".join(bytes(v) for v in views) == b"".join(f[1] for f in frames)


def test_bad_preamble_is_a_protocol_error() -> None:
    server = _zero_copy_server()
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n")


def test_oversized_frame_is_refused_from_its_header() -> None:
    server = _zero_copy_server()
    server.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    # A DATA header announcing 2 MiB (more than the 16 KiB in force until our SETTINGS are acked):
    # refused before the body is buffered.
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(b"\x20\x00\x00\x00\x00\x00\x00\x00\x01")


def test_data_on_stream_zero_is_a_protocol_error() -> None:
    server = _zero_copy_server()
    server.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")


def test_reader_grows_for_a_frame_larger_than_its_buffer() -> None:
    reader = FrameReader(server=False)
    reader.max_frame_size = (1 << 24) - 1
    size = h2frames.RECV_BUFFER_SIZE + 12345
    frame = size.to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + _payload(size, 9)
    reader.add_data(frame[:100])
    assert list(reader) == []
    target = reader.get_buffer(-1)
    assert len(target) >= size + 9 - 100, "the buffer must make room for the whole announced frame"
    target[:len(frame) - 100] = frame[100:]
    reader.commit(len(frame) - 100)
    (data_frame,) = list(reader)
    assert bytes(data_frame.data) == frame[9:]
