#!/usr/bin/env python3
"""Micro-benchmark of HBONE's user-space byte path, without sockets or the event loop:

    payload -> h2 DATA frames -> TLS 1.3 (ssl.SSLObject over memory BIOs) -> h2 frame parsing -> payload

once with stock h2 (serialize, data_to_send(), receive_data(bytes)) and once with ztproxy.proxy.h2.frames
(take_output() pieces, TLS decrypting into the FrameReader). It reports CPU seconds per GB
(time.process_time), which a loaded machine disturbs far less than end-to-end throughput: this is the
figure the zero-copy work changes. No root needed.

    .venv/bin/python bench/micro.py [--gb 1]
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import h2.config
import h2.connection
import h2.events
import h2.settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from systems import Pki  # noqa: E402

from ztproxy.proxy.h2.frames import ZeroCopyH2Connection  # noqa: E402

CHUNK = 256 * 1024  # what the event loop hands the pump per TCP read
FRAME = 1 << 20
WINDOW = 1 << 30


def tls_pair(pki: Pki):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(pki.chain("server"), pki.key("server"))
    server_ctx.load_verify_locations(pki.bundle)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.load_cert_chain(pki.chain("client"), pki.key("client"))
    client_ctx.load_verify_locations(pki.bundle)
    bios = [ssl.MemoryBIO() for _ in range(4)]  # c_in, c_out, s_in, s_out
    client = client_ctx.wrap_bio(bios[0], bios[1])
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(20):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if done == 2:
            break
    return client, server, bios


def run(kind: str, total: int, pki: Pki) -> Dict:
    client_tls, server_tls, (c_in, c_out, s_in, s_out) = tls_pair(pki)
    zero = kind == "zero-copy"
    cfg = {True: h2.config.H2Configuration(client_side=True, header_encoding=None),
           False: h2.config.H2Configuration(client_side=False, header_encoding=None)}
    make: Callable = ZeroCopyH2Connection if zero else (lambda c: h2.connection.H2Connection(config=c))
    client, server = make(cfg[True]), make(cfg[False])
    for conn in (client, server):
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME,
                              h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        conn.increment_flow_control_window(WINDOW)
    for _ in range(3):  # settings and acks, in the clear: only the DATA path is measured
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
    server.receive_data(client.data_to_send())
    payload = bytes(range(256)) * (CHUNK // 256)
    received = 0
    start = time.process_time()
    sent = 0
    while sent < total:
        client.send_data(1, payload)
        sent += len(payload)
        pieces = client.take_output() if zero else [client.data_to_send()]
        for piece in pieces:
            client_tls.write(piece)
        s_in.write(c_out.read())
        if zero:
            reader = server.incoming_buffer
            while True:
                target = reader.get_buffer(s_in.pending + 256)
                try:
                    n = server_tls.read(len(target), target)
                except ssl.SSLWantReadError:
                    break
                reader.commit(n)
                events = server.receive_data(b"")
                received += _consume(server, events)
        else:
            while True:
                try:
                    data = server_tls.read(CHUNK)
                except ssl.SSLWantReadError:
                    break
                received += _consume(server, server.receive_data(data))
        client.receive_data(server.data_to_send())  # WINDOW_UPDATEs back (in the clear)
    cpu = time.process_time() - start
    assert received == sent, (received, sent)
    return {"kind": kind, "bytes": sent, "cpu_s": round(cpu, 3),
            "cpu_s_per_gb": round(cpu / (sent / 1e9), 3),
            "mb_per_cpu_s": round(sent / 1e6 / cpu, 1)}


def _consume(conn, events) -> int:
    n = 0
    for event in events:
        if isinstance(event, h2.events.DataReceived):
            n += len(event.data)
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="payload per variant (default 1 GB)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per variant (best kept)")
    args = parser.parse_args()
    total = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        pki = Pki(Path(tmp))
        best: Dict[str, Dict] = {}
        for _ in range(args.repeat):
            for kind in ("stock-h2", "zero-copy"):
                result = run(kind, total, pki)
                if kind not in best or result["cpu_s"] < best[kind]["cpu_s"]:
                    best[kind] = result
    for result in best.values():
        print(json.dumps(result))
    ratio = best["stock-h2"]["cpu_s"] / best["zero-copy"]["cpu_s"]
    print(f"zero-copy framing uses {1 / ratio:.2f}x the CPU of stock h2 per byte ({ratio:.2f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
