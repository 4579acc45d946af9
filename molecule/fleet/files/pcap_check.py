#!/usr/bin/env python3
"""Summarize a pcap file for the fleet scenario: packets per TCP port, whether TLS application-data
records appear in the HBONE (15008) payloads, and whether a secret string appears anywhere.

usage: pcap_check.py FILE SECRET   (prints JSON)
"""

from __future__ import annotations

import json
import struct
import sys
from collections import Counter


def packets(path: str):
    with open(path, "rb") as handle:
        header = handle.read(24)
        endian = "<" if header[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        linktype = struct.unpack(endian + "I", header[20:24])[0]
        while True:
            record = handle.read(16)
            if len(record) < 16:
                return
            incl = struct.unpack(endian + "IIII", record)[2]
            yield linktype, handle.read(incl)


def ipv4_tcp(linktype: int, frame: bytes):
    """(sport, dport, payload) of an IPv4 TCP packet, else None. Ethernet (1) and Linux SLL (113/276)."""
    offsets = {1: 14, 113: 16, 276: 20}
    if linktype not in offsets:
        return None
    ip = frame[offsets[linktype]:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
        return None
    ihl = (ip[0] & 0x0F) * 4
    tcp = ip[ihl:]
    if len(tcp) < 20:
        return None
    sport, dport = struct.unpack("!HH", tcp[:4])
    return sport, dport, tcp[(tcp[12] >> 4) * 4:]


def main() -> int:
    path, secret = sys.argv[1], sys.argv[2].encode()
    ports: Counter = Counter()
    tls_records = 0
    secret_seen = False
    for linktype, frame in packets(path):
        secret_seen |= secret in frame
        parsed = ipv4_tcp(linktype, frame)
        if parsed is None:
            continue
        sport, dport, payload = parsed
        for port in {sport, dport} & {8080, 15008}:
            ports[port] += 1
        # A TLS 1.2/1.3 record header: content type (application data 23, handshake 22), version 3.3.
        if 15008 in (sport, dport) and payload[:1] in (b"\x16", b"\x17") and payload[1:3] == b"\x03\x03":
            tls_records += 1
    print(json.dumps({"port_8080": ports[8080], "port_15008": ports[15008], "tls_records": tls_records,
                      "secret_seen": secret_seen}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
