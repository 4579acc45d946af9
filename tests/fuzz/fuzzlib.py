"""Strategies shared by the fuzz tests: raw HTTP/2 frames and HPACK header blocks."""

from __future__ import annotations

import struct
from typing import List, Tuple

import hpack
from hypothesis import strategies as st

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_TYPES = list(range(0, 10)) + [0x10, 0xFF]  # the defined types, and unknown ones (to be ignored)


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One frame, its length always the payload's: contents are fuzzed, framing is not (a declared
    length longer than what follows only makes the peer wait)."""
    head = struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", stream_id)
    return head + payload


header_names = st.sampled_from([":method", ":authority", ":path", ":scheme", ":protocol", "forwarded",
                                "baggage", "traceparent", "connection", "te", "content-length", "x-a",
                                "Upper", ""])
header_values = st.one_of(
    st.sampled_from(["CONNECT", "GET", "127.0.0.3:1", "127.0.0.3:0", "[::1]:80", "127.0.0.3",
                     'for="127.0.0.2:4"', "trailers", "close", "http", "/"]),
    st.text(max_size=40),
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)


@st.composite
def header_block(draw) -> bytes:
    headers: List[Tuple[str, str]] = draw(header_lists)
    if draw(st.booleans()):
        headers = [(":method", "CONNECT"), (":authority", draw(header_values))] + headers
    return hpack.Encoder().encode(headers)


@st.composite
def frames(draw, max_frames: int = 12) -> bytes:
    """A sequence of frames after the preface: raw ones of any type and flags, HEADERS carrying real
    HPACK blocks (HBONE requests, valid or not), and their CONTINUATION frames."""
    out = []
    for _ in range(draw(st.integers(0, max_frames))):
        kind = draw(st.sampled_from(["raw", "headers", "headers+continuation", "data", "settings", "rst"]))
        sid = draw(st.sampled_from([0, 1, 3, 5, 7, 2, 0x7FFFFFFF]))
        if kind == "raw":
            out.append(frame(draw(st.sampled_from(FRAME_TYPES)), draw(st.integers(0, 255)), sid,
                             draw(st.binary(max_size=64))))
        elif kind == "headers":
            out.append(frame(1, draw(st.sampled_from([4, 5, 0x24, 0x0C, 0])), sid, draw(header_block())))
        elif kind == "headers+continuation":
            block = draw(header_block())
            cut = draw(st.integers(0, len(block)))
            out.append(frame(1, 0, sid, block[:cut]))
            out.append(frame(9, draw(st.sampled_from([4, 0])), sid, block[cut:]))
        elif kind == "data":
            out.append(frame(0, draw(st.sampled_from([0, 1, 8, 9])), sid, draw(st.binary(max_size=200))))
        elif kind == "settings":
            pairs = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2**32 - 1)), max_size=4))
            out.append(frame(4, draw(st.sampled_from([0, 1])), 0,
                             b"".join(struct.pack("!HI", k, v) for k, v in pairs)))
        else:
            out.append(frame(3, 0, sid, struct.pack("!I", draw(st.integers(0, 2**32 - 1)))))
    return b"".join(out)
