"""Unary gRPC over HTTP/2 (the ``h2`` library) on asyncio TLS streams: a server and a client.

Only what the certificate API needs: one request message and one response message per call, status in
trailers (or a trailers-only response for errors). Interoperates with grpcio, Go gRPC (istiod) and tonic
(ztunnel); the netns tests check it against grpcio and a raw h2 client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from . import grpcwire
from .grpcwire import GrpcError

log = logging.getLogger("ztproxy.identity.grpc")

READ_SIZE = 65536
IDLE_TIMEOUT = 30.0  # a renewal takes one request; idle connections are not kept


@dataclass(frozen=True)
class CallContext:
    """What the server knows about one call: the verified client certificate and the request metadata."""

    peer_cert_der: Optional[bytes]
    peer_address: Tuple[str, int]
    headers: Dict[str, str]


Handler = Callable[[bytes, CallContext], Awaitable[bytes]]
# Called right after the TLS handshake with the client's DER certificate; False closes the connection
# before any HTTP/2 byte is exchanged (revocation, deny lists).
Admission = Callable[[Optional[bytes], Tuple[str, int]], bool]


def _flush(conn: h2.connection.H2Connection, writer: asyncio.StreamWriter) -> None:
    data = conn.data_to_send()
    if data:
        writer.write(data)


def _send_body(conn: h2.connection.H2Connection, stream_id: int, body: bytes) -> None:
    # Responses are a few KiB: below the initial window, but split by the peer's frame size anyway.
    size = conn.max_outbound_frame_size
    for offset in range(0, len(body), size):
        conn.send_data(stream_id, body[offset : offset + size])


class GrpcServer:
    """Serves one unary method on a TLS listener; several listeners may share one instance."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        ssl_context: ssl.SSLContext,
        admission: Optional[Admission] = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self.handler = handler
        self.ssl_context = ssl_context
        self.admission = admission
        self.handshake_timeout = handshake_timeout
        self._servers: List[asyncio.AbstractServer] = []

    async def listen(self, host: str, port: int) -> Tuple[str, int]:
        server = await asyncio.start_server(
            self._connection, host, port, ssl=self.ssl_context, ssl_handshake_timeout=self.handshake_timeout
        )
        self._servers.append(server)
        address = server.sockets[0].getsockname()
        return address[0], address[1]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[:2]
        ssl_object = writer.get_extra_info("ssl_object")
        peer_der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        try:
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                log.info("closing connection from %s: ALPN h2 not negotiated", peer)
                return
            if self.admission is not None and not self.admission(peer_der, peer):
                return
            await self._serve_h2(reader, writer, peer_der, peer)
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            ssl.SSLError,
            asyncio.TimeoutError,
            h2.exceptions.ProtocolError,
        ) as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                await writer.wait_closed()

    async def _serve_h2(self, reader, writer, peer_der, peer) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        _flush(conn, writer)
        requests: Dict[int, Tuple[Dict[str, str], bytearray]] = {}
        tasks = set()
        while True:
            data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = (dict(event.headers), bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    entry = requests.get(event.stream_id)
                    if entry is not None:
                        entry[1].extend(event.data)
                        if len(entry[1]) > grpcwire.MAX_MESSAGE + 5:
                            requests.pop(event.stream_id)
                            self._respond_error(
                                conn,
                                event.stream_id,
                                GrpcError(grpcwire.RESOURCE_EXHAUSTED, "request too large"),
                            )
                elif isinstance(event, h2.events.StreamEnded):
                    entry = requests.pop(event.stream_id, None)
                    if entry is not None:
                        task = asyncio.ensure_future(
                            self._call(
                                conn, writer, event.stream_id, entry[0], bytes(entry[1]), peer_der, peer
                            )
                        )
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                elif isinstance(event, h2.events.StreamReset):
                    requests.pop(event.stream_id, None)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    _flush(conn, writer)
                    return
            _flush(conn, writer)
            await writer.drain()
        for task in list(tasks):
            task.cancel()

    async def _call(self, conn, writer, stream_id, headers, body, peer_der, peer) -> None:
        try:
            if headers.get(":method") != "POST" or headers.get(":path") != self.path:
                raise GrpcError(
                    grpcwire.UNIMPLEMENTED,
                    f"unknown method {headers.get(':path')}; this server implements {self.path}",
                )
            if not headers.get("content-type", "").startswith(grpcwire.CONTENT_TYPE):
                raise GrpcError(grpcwire.INVALID_ARGUMENT, "content-type must be application/grpc")
            if headers.get("grpc-encoding", "identity") != "identity" and body[:1] == b"\x01":
                raise GrpcError(grpcwire.UNIMPLEMENTED, "compression is not supported")
            request = grpcwire.unframe(body)
            context = CallContext(
                peer_cert_der=peer_der,
                peer_address=peer,
                headers={k: v for k, v in headers.items() if not k.startswith(":")},
            )
            response = await self.handler(request, context)
        except GrpcError as exc:
            self._respond_error(conn, stream_id, exc)
        except Exception as exc:  # never let one bad call kill the connection; report it as INTERNAL
            log.exception("certificate request from %s failed", peer)
            self._respond_error(conn, stream_id, GrpcError(grpcwire.INTERNAL, f"internal error: {exc}"))
        else:
            try:
                conn.send_headers(stream_id, [(":status", "200"), ("content-type", grpcwire.CONTENT_TYPE)])
                _send_body(conn, stream_id, grpcwire.frame(response))
                conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
            except h2.exceptions.StreamClosedError:
                return
        try:
            _flush(conn, writer)
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass

    @staticmethod
    def _respond_error(conn, stream_id: int, error: GrpcError) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            conn.send_headers(
                stream_id,
                [
                    (":status", "200"),
                    ("content-type", grpcwire.CONTENT_TYPE),
                    ("grpc-status", str(error.code)),
                    ("grpc-message", grpcwire.percent_encode(error.message)),
                ],
                end_stream=True,
            )


async def unary_call(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    path: str,
    payload: bytes,
    *,
    server_hostname: Optional[str] = None,
    metadata: Sequence[Tuple[str, str]] = (),
    timeout: float = 10.0,
    verify_peer: Optional[Callable[[bytes], None]] = None,
) -> bytes:
    """One unary gRPC call on a fresh connection; returns the response message or raises GrpcError /
    OSError / ssl.SSLError / asyncio.TimeoutError."""
    return await asyncio.wait_for(
        _unary_call(host, port, ssl_context, path, payload, server_hostname, metadata, verify_peer), timeout
    )


async def _unary_call(
    host, port, ssl_context, path, payload, server_hostname, metadata, verify_peer
) -> bytes:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_context, server_hostname=server_hostname or ""
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object.selected_alpn_protocol() != "h2":
            raise GrpcError(grpcwire.UNAVAILABLE, f"{host}:{port} did not negotiate HTTP/2 (ALPN h2)")
        if verify_peer is not None:
            verify_peer(ssl_object.getpeercert(binary_form=True))
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", authority),
            ("content-type", grpcwire.CONTENT_TYPE),
            ("te", "trailers"),
            ("user-agent", "ztproxy-grpc"),
        ]
        conn.send_headers(stream_id, headers + [(k.lower(), v) for k, v in metadata])
        _send_body(conn, stream_id, grpcwire.frame(payload))
        conn.end_stream(stream_id)
        _flush(conn, writer)
        await writer.drain()
        status_headers: Dict[str, str] = {}
        body = bytearray()
        done = False
        while not done:
            data = await reader.read(READ_SIZE)
            if not data:
                raise GrpcError(
                    grpcwire.UNAVAILABLE,
                    f"{host}:{port} closed the connection before answering (usually: it refused this node's "
                    "certificate as expired, revoked or not from its trust bundle; see its log)",
                )
            for event in conn.receive_data(data):
                if (
                    isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived))
                    and event.stream_id == stream_id
                ):
                    status_headers.update(dict(event.headers))
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    body.extend(event.data)
                    if len(body) > grpcwire.MAX_MESSAGE + 5:
                        raise GrpcError(grpcwire.RESOURCE_EXHAUSTED, "response too large")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    done = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    raise GrpcError(
                        grpcwire.UNAVAILABLE, f"{host}:{port} reset the stream (code {event.error_code})"
                    )
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise GrpcError(grpcwire.UNAVAILABLE, f"{host}:{port} sent GOAWAY ({event.error_code})")
            _flush(conn, writer)
        if status_headers.get(":status") != "200":
            raise GrpcError(
                grpcwire.UNAVAILABLE, f"{host}:{port} answered HTTP {status_headers.get(':status')}"
            )
        code = int(status_headers.get("grpc-status", grpcwire.UNAVAILABLE))
        if code != grpcwire.OK:
            raise GrpcError(code, grpcwire.percent_decode(status_headers.get("grpc-message", "")))
        conn.close_connection()
        _flush(conn, writer)
        return grpcwire.unframe(bytes(body))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            await writer.wait_closed()
