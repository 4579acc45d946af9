"""The byte pump's boundary and the data plane's layering.

``ztproxy/proxy/copy.py`` declares what a pump needs of the connection carrying its stream
(``StreamCarrier``) and imports nothing of the HTTP/2 code; ``H2Session`` implements that protocol and
calls the pump through ``StreamHandler``. A native data path will plug in here, so the interface is
checked member by member, and a pump is driven through a carrier that is not HTTP/2 at all. The
handlers receive ``ProxyInputs`` and never import the proxy that builds them.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import socket
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from ztproxy.hooks import Failure, Reason
from ztproxy.proxy import copy
from ztproxy.proxy.h2.session import H2Session, StreamHandler

PROXY = Path(copy.__file__).resolve().parent


def _protocol_members(protocol: type) -> List[str]:
    return sorted(name for name in vars(protocol) if not name.startswith("_"))


def _imports(path: Path) -> List[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
    return out


def test_the_pump_imports_nothing_of_http2() -> None:
    imports = _imports(PROXY / "copy.py")
    assert not [m for m in imports if m == "h2" or m.startswith(("h2.", "hyperframe", "hpack"))]
    assert not [m for m in imports if m.startswith("ztproxy.") and m != "ztproxy.hooks"]


def test_the_http2_session_implements_the_carrier_the_pump_declares() -> None:
    members = _protocol_members(copy.StreamCarrier)
    assert members == ["acknowledge", "bind", "flush", "reset", "send_capacity", "send_data", "send_end",
                       "stream_finished", "write_paused"]
    for name in members:
        assert hasattr(H2Session, name) or name in H2Session.__init__.__code__.co_names, name
        declared = getattr(copy.StreamCarrier, name)
        if inspect.isfunction(declared):
            assert list(inspect.signature(declared).parameters) == \
                list(inspect.signature(getattr(H2Session, name)).parameters), name


def test_the_pump_implements_what_the_session_calls() -> None:
    for name in _protocol_members(StreamHandler):
        assert list(inspect.signature(getattr(StreamHandler, name)).parameters) == \
            list(inspect.signature(getattr(copy.StreamPump, name)).parameters), name


class FakeCarrier:
    """A StreamCarrier without HTTP/2: a window and a list of what was sent."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.write_paused = False
        self.sent: List[bytes] = []
        self.ended = False
        self.resets: List[Tuple[int, int]] = []
        self.acked = 0
        self.finished: List[int] = []
        self.pumps: Dict[int, copy.StreamPump] = {}

    def bind(self, stream_id: int, pump: copy.StreamPump) -> None:
        self.pumps[stream_id] = pump

    def send_capacity(self, stream_id: int) -> int:
        return self.window

    def send_data(self, stream_id: int, data: memoryview) -> bool:
        self.window -= len(data)
        self.sent.append(bytes(data))
        return True

    def send_end(self, stream_id: int) -> bool:
        self.ended = True
        return True

    def reset(self, stream_id: int, code: int) -> None:
        self.resets.append((stream_id, code))

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.acked += n

    def flush(self) -> None:
        pass

    def stream_finished(self, stream_id: int) -> None:
        self.finished.append(stream_id)


class Tracker:
    def __init__(self) -> None:
        self.received = self.sent = 0
        self.failure: Optional[Failure] = None
        self.closes = 0

    def add_received(self, n: int) -> None:
        self.received += n

    def add_sent(self, n: int) -> None:
        self.sent += n

    def closed(self, failure: Optional[Failure] = None) -> None:
        self.closes += 1
        self.failure = failure


def test_a_pump_moves_bytes_through_any_carrier_and_ends_with_a_typed_failure() -> None:
    async def run() -> None:
        loop = asyncio.get_event_loop()
        app_side, proxy_side = socket.socketpair()
        app_side.setblocking(False)
        carrier, tracker = FakeCarrier(window=5), Tracker()
        pump = copy.StreamPump(tracker, tcp_is_client=True)
        pump.bind_stream(carrier, 1)
        assert carrier.pumps[1] is pump
        transport, _ = await loop.connect_accepted_socket(lambda: pump, proxy_side)
        pump.attach_tcp(transport)
        pump.start()
        await loop.sock_sendall(app_side, b"hello world")
        for _ in range(500):
            await asyncio.sleep(0.01)
            if tracker.received == 11:
                break
        assert carrier.sent == [b"hello"]  # the window bounds what is sent; the rest waits
        carrier.window = 100
        pump.on_window()
        assert b"".join(carrier.sent) == b"hello world" and tracker.received == 11
        pump.on_h2_data(b"answer", 6)
        assert await loop.sock_recv(app_side, 100) == b"answer"
        for _ in range(100):
            if carrier.acked == 6:
                break
            await asyncio.sleep(0.01)
        assert carrier.acked == 6 and tracker.sent == 6
        pump.on_h2_reset("stream reset by peer (test)")
        assert tracker.closes == 1 and tracker.failure is not None
        assert tracker.failure.reason is Reason.STREAM_RESET
        assert tracker.failure.reason.response_flag == "CONNECT"
        assert carrier.finished == [1]
        app_side.close()

    asyncio.run(run())


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_pump_started_on_a_backlogged_connection_stops_reading_its_socket(loop_kind: str) -> None:
    """Issue 13, slow reader: a pump whose carrier is already write_paused when the stream starts
    must not read its TCP socket (beyond what was read before the pause), on both event loops, although
    the window would take everything. The pump used to pause in connection_made, which neither loop
    honours there, and then believed the socket paused while the loop kept reading it."""

    async def run() -> int:
        loop = asyncio.get_event_loop()
        app_side, proxy_side = socket.socketpair()
        app_side.setblocking(False)
        carrier, tracker = FakeCarrier(window=1 << 30), Tracker()
        carrier.write_paused = True  # the TLS connection is backlogged before the stream starts
        pump = copy.StreamPump(tracker, tcp_is_client=True)
        pump.bind_stream(carrier, 1)
        transport, _ = await loop.connect_accepted_socket(lambda: pump, proxy_side)
        pump.attach_tcp(transport)
        pump.start()
        chunk = b"x" * 65536
        deadline = loop.time() + 1.0
        while loop.time() < deadline:  # an endless sender: whatever the socket buffers take
            try:
                app_side.send(chunk)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            else:
                await asyncio.sleep(0)
        received = tracker.received
        transport.abort()
        app_side.close()
        return received

    if loop_kind == "uvloop":
        import uvloop

        received = uvloop.run(run())
    else:
        received = asyncio.run(run())
    # Nothing at all is read once paused; before the fix the pump read (and sent) everything the
    # sender wrote in that second, hundreds of MiB.
    assert received <= 1 << 20, f"{received} bytes read from the socket of a paused stream"


def test_handlers_receive_inputs_and_never_import_the_proxy() -> None:
    for path in sorted(PROXY.rglob("*.py")):
        if path.name in ("proxy.py", "__init__.py") and path.parent == PROXY:
            continue
        imports = _imports(path)
        assert "ztproxy.proxy.proxy" not in imports, path
        assert "ztproxy.app" not in imports, path
        if path.parent.name == "h2" or path.name == "copy.py":
            handlers = ("ztproxy.proxy.inbound", "ztproxy.proxy.outbound", "ztproxy.proxy.inputs",
                        "ztproxy.proxy.pool")
            assert not [m for m in imports if m.startswith(handlers)], path
