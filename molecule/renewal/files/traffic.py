#!/usr/bin/python3
"""Traffic through the mesh for the renewal scenario, run on a node until SIGTERM.

* one long-lived TCP connection to LONG (host:port) that sends a numbered line every 0.5 s and must get
  each one echoed back within 5 s: it must survive every certificate renewal (established connections
  keep their TLS session);
* a new connection every second to each of NEW (host:port,...), one line echoed, closed: new connections
  use the renewed certificates.

Every second the counts go to STATUS (JSON, replaced atomically): long_ok, long_error (the first
failure of the long-lived connection, null while it holds), new_ok, new_failed, failures (the last 20,
with their time), started, updated.
"""

import json
import os
import signal
import socket
import sys
import threading
import time

STOP = threading.Event()
LOCK = threading.Lock()
STATUS = {"long_ok": 0, "long_error": None, "new_ok": 0, "new_failed": 0, "failures": [],
          "started": time.time(), "updated": time.time()}


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def exchange(sock, reader, line):
    sock.sendall(line)
    answer = reader.readline()
    if answer != line:
        raise ConnectionError(f"sent {line!r}, got back {answer!r}")


def long_lived(target):
    try:
        sock = socket.create_connection(target, timeout=5)
        reader = sock.makefile("rb")
        n = 0
        while not STOP.is_set():
            n += 1
            exchange(sock, reader, b"long %d\n" % n)
            with LOCK:
                STATUS["long_ok"] += 1
            STOP.wait(0.5)
        sock.close()
    except Exception as exc:  # the first failure ends it: the test requires none
        with LOCK:
            STATUS["long_error"] = f"{time.time():.0f}: {type(exc).__name__}: {exc}"


def new_connections(targets):
    n = 0
    while not STOP.is_set():
        for target in targets:
            n += 1
            try:
                with socket.create_connection(target, timeout=5) as sock:
                    exchange(sock, sock.makefile("rb"), b"new %d\n" % n)
                with LOCK:
                    STATUS["new_ok"] += 1
            except Exception as exc:
                with LOCK:
                    STATUS["new_failed"] += 1
                    STATUS["failures"] = (STATUS["failures"] + [
                        f"{time.time():.0f} {target[0]}:{target[1]}: {type(exc).__name__}: {exc}"])[-20:]
        STOP.wait(1.0)


def write_status(path):
    with LOCK:
        STATUS["updated"] = time.time()
        data = json.dumps(STATUS)
    with open(path + ".tmp", "w") as handle:
        handle.write(data)
    os.replace(path + ".tmp", path)


def main(long_target, new_targets, status_path):
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    threads = [threading.Thread(target=long_lived, args=(address(long_target),)),
               threading.Thread(target=new_connections, args=([address(t) for t in new_targets.split(",")],))]
    for thread in threads:
        thread.start()
    while not STOP.wait(1.0):
        write_status(status_path)
    for thread in threads:
        thread.join(10)
    write_status(status_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
