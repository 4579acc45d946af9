"""ztproxy's HTTP endpoints: admin (localhost:15000), Prometheus metrics (15020), readiness (15021).

Endpoints (ztunnel's names):

* admin, bound to localhost only: ``GET /config_dump`` (settings, mesh state, certificates: identity,
  serial, validity; never a private key), ``GET /logging`` (levels), ``POST|PUT /logging?level=debug`` or
  ``?ztproxy.access=info`` (change levels at run time), ``POST /quitquitquit`` (graceful drain);
* metrics: ``GET /metrics`` and ``GET /stats/prometheus`` (Prometheus text, or OpenMetrics when the
  scraper asks for it);
* readiness: ``GET /healthz/ready``: 200 once certificates and mesh state are loaded and the listeners
  are up, 503 naming what is still missing otherwise.

The HTTP/1.1 server is a few dozen lines on asyncio streams rather than a framework: the venv has no
asyncio HTTP server library (aiohttp would be a heavy new dependency on every node for six fixed GET/
POST endpoints), and the standard library's http.server is thread-based and cannot share the proxy's
event loop. It serves one request per connection, bounds the request head and body, and times out a
slow client, so a stuck or hostile client cannot hold memory or a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import inspect
import ipaddress
import json
import logging
import re
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("ztproxy.admin")

# The listen addresses (ztunnel's ports) are settings: ztproxy/config.py, Listeners.
MAX_HEAD_BYTES = 16 * 1024  # request line + headers
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT = 5.0  # seconds to receive the whole request
WRITE_TIMEOUT = 10.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# --------------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 server


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]  # lower-case names
    body: bytes = b""


@dataclasses.dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Tuple[Tuple[str, str], ...] = ()
    # Called once the response has been written (e.g. start the drain after answering /quitquitquit).
    after: Optional[Callable[[], Any]] = None

    @classmethod
    def text(cls, status: int, text: str, **kw: Any) -> Response:
        return cls(status, text.encode("utf-8"), **kw)

    @classmethod
    def json(cls, status: int, data: Any, **kw: Any) -> Response:
        body = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
        return cls(status, body.encode("utf-8"), "application/json", **kw)


Handler = Callable[[Request], Union[Response, Awaitable[Response]]]
Routes = Mapping[str, Mapping[str, Handler]]  # path -> method -> handler


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpServer:
    """Serves ``routes`` on asyncio streams: one request per connection, bounded and timed out."""

    def __init__(self, name: str, routes: Routes) -> None:
        self.name = name
        self.routes = routes
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self, host: str, port: int) -> asyncio.AbstractServer:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)
        log.info("%s listening on %s", self.name, ", ".join(_sockname(s) for s in self._server.sockets))
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = ""
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
                method = request.method
                response = await self._dispatch(request)
            except _BadRequest as exc:
                response = Response.text(exc.status, f"{exc}\n")
            except asyncio.TimeoutError:
                response = Response.text(408, f"request not received within {REQUEST_TIMEOUT:g}s\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client went away before sending a whole request
            written = _write_response(writer, response, head_only=method == "HEAD")
            await asyncio.wait_for(written, WRITE_TIMEOUT)
            if response.after is not None:
                result = response.after()
                if inspect.isawaitable(result):
                    asyncio.ensure_future(result)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _dispatch(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            known = "\n".join(sorted(self.routes))
            return Response.text(404, f"no endpoint {request.path}; endpoints:\n{known}\n")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return Response.text(405, f"{request.method} is not allowed on {request.path}; use {allowed}\n",
                                 headers=(("Allow", allowed),))
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as exc:  # an endpoint's bug must not kill the server
            log.exception("%s %s failed", request.method, request.path)
            return Response.text(500, f"internal error: {exc}\n")


def _sockname(sock: Any) -> str:
    name = sock.getsockname()
    return f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}"


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _BadRequest(400, "incomplete request head") from None
        raise
    try:
        text = head.decode("iso-8859-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _BadRequest(400, "undecodable request head") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1].startswith("/"):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, f"{version!r} is not supported; use HTTP/1.1")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise _BadRequest(400, f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(411, "chunked request bodies are not supported; send Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _BadRequest(400, "Content-Length must be a non-negative integer")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise _BadRequest(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    body = await reader.readexactly(length) if length else b""
    split = urlsplit(target)
    query = parse_qs(split.query, keep_blank_values=True, max_num_fields=100)
    return Request(method, split.path, query, headers, body)


async def _write_response(writer: asyncio.StreamWriter, response: Response, head_only: bool) -> None:
    reason = _REASONS.get(response.status, "Unknown")
    head = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}", "Connection: close", "Cache-Control: no-store"]
    head.extend(f"{k}: {v}" for k, v in response.headers)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("iso-8859-1"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()


# --------------------------------------------------------------------------------------------------
# /config_dump


_SECRET_KEY = re.compile(r"(private|passw|secret|token)", re.IGNORECASE)
REDACTED = "<redacted>"


def to_jsonable(value: Any, key: str = "") -> Any:
    """Plain JSON data from settings/state objects, with anything secret-looking redacted.

    Private keys must never leave the node: a field whose name looks secret is dropped to
    ``<redacted>``, and so is any string that holds a PEM private key, wherever it appears.
    """
    if key and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return REDACTED if "PRIVATE KEY" in value else value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, bytes):
        return REDACTED if b"PRIVATE KEY" in value else f"<{len(value)} bytes>"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
                          ipaddress.IPv6Network, datetime.datetime)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), f.name)
                for f in dataclasses.fields(value) if not f.name.startswith("_")}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    return str(value)


def describe_certificate(cert: x509.Certificate, now: Optional[datetime.datetime] = None) -> Dict[str, Any]:
    """Identity, serial and validity of one certificate (public parts only)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        not_before = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)
        not_after = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = []
    try:
        is_ca = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {
        "identity": uris[0] if uris else None,
        "uri_sans": uris,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": not_before.isoformat(),
        "not_after": not_after.isoformat(),
        "seconds_to_expiry": int((not_after - now).total_seconds()),
        "expired": now >= not_after,
        "is_ca": is_ca,
    }


def describe_certificates(certs: Iterable[Any]) -> List[Any]:
    """Certificates given as x509 objects, PEM (bytes/str, possibly several) or ready-made dicts."""
    out: List[Any] = []
    for item in certs:
        if isinstance(item, x509.Certificate):
            out.append(describe_certificate(item))
        elif isinstance(item, (bytes, str)):
            data = item.encode() if isinstance(item, str) else item
            out.extend(describe_certificate(c) for c in x509.load_pem_x509_certificates(data))
        elif isinstance(item, Mapping):
            out.append(to_jsonable(item))
        else:
            raise TypeError(f"cannot describe a certificate given as {type(item).__name__}")
    return out


# --------------------------------------------------------------------------------------------------
# /logging


_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL, "off": 100}
PROJECT_LOGGER = "ztproxy"


def logging_levels() -> Dict[str, str]:
    """The effective level of the project's loggers (those created so far) and of the root logger."""
    names = sorted(n for n in logging.root.manager.loggerDict
                   if n == PROJECT_LOGGER or n.startswith(PROJECT_LOGGER + "."))
    if PROJECT_LOGGER not in names:
        names.insert(0, PROJECT_LOGGER)
    levels = {"root": logging.getLevelName(logging.root.level).lower()}
    for name in names:
        levels[name] = logging.getLevelName(logging.getLogger(name).getEffectiveLevel()).lower()
    return levels


def parse_level_changes(query: Mapping[str, List[str]]) -> Dict[str, int]:
    """``level=debug`` (the whole proxy), ``level=ztproxy.dns:debug,ztproxy.access:info`` (ztunnel's
    form) or ``ztproxy.access=info``. Raises ValueError naming the bad part; nothing is changed then."""
    changes: Dict[str, int] = {}

    def level_of(text: str, what: str) -> int:
        level = _LEVELS.get(text.strip().lower())
        if level is None:
            raise ValueError(f"{what}: {text!r} is not a level; use one of {', '.join(_LEVELS)}")
        return level

    for key, values in query.items():
        for value in values:
            if key == "level":
                for part in value.split(","):
                    name, sep, level_text = part.rpartition(":")
                    if sep:
                        if not name.strip():
                            raise ValueError(f"level: {part!r} needs a logger name before ':'")
                        changes[_logger_name(name.strip())] = level_of(level_text, f"level {name.strip()}")
                    else:
                        changes[PROJECT_LOGGER] = level_of(level_text, "level")
            else:
                changes[_logger_name(key)] = level_of(value, key)
    if not changes:
        raise ValueError("nothing to change: give ?level=<level> or ?<logger>=<level>")
    return changes


def _logger_name(name: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.-]+$", name):
        raise ValueError(f"{name!r} is not a logger name")
    return name if name == PROJECT_LOGGER or name.startswith(PROJECT_LOGGER + ".") \
        else f"{PROJECT_LOGGER}.{name}"


def apply_level_changes(changes: Mapping[str, int]) -> None:
    for name, level in changes.items():
        logging.getLogger(name).setLevel(level)
        log.warning("log level of %s set to %s", name, logging.getLevelName(level).lower())


# --------------------------------------------------------------------------------------------------
# The three servers


Provider = Callable[[], Any]


def admin_routes(
    settings: Provider,
    mesh_state: Provider,
    certificates: Provider,
    on_quit: Callable[[], Any],
    extra: Optional[Mapping[str, Provider]] = None,
) -> Routes:
    """Routes of the admin server. Providers are called at request time, so the dump is current."""

    def config_dump(_: Request) -> Response:
        dump: Dict[str, Any] = {
            "settings": to_jsonable(settings()),
            "mesh_state": to_jsonable(mesh_state()),
            "certificates": describe_certificates(certificates() or ()),
        }
        for name, provider in (extra or {}).items():
            dump[name] = to_jsonable(provider())
        return Response.json(200, dump)

    def get_logging(_: Request) -> Response:
        return Response.json(200, {"levels": logging_levels(),
                                   "usage": "POST /logging?level=debug or ?ztproxy.access=info"})

    def set_logging(request: Request) -> Response:
        try:
            changes = parse_level_changes(request.query)
        except ValueError as exc:
            return Response.text(400, f"{exc}\n")
        apply_level_changes(changes)
        return Response.json(200, {"levels": logging_levels()})

    def quit_(_: Request) -> Response:
        log.warning("drain requested through /quitquitquit")
        return Response.text(200, "OK\n", after=on_quit)

    def index(_: Request) -> Response:
        return Response.text(200, "ztproxy admin\n  GET  /config_dump\n  GET  /logging\n"
                                  "  POST /logging?level=<level>|<logger>=<level>\n  POST /quitquitquit\n")

    return {
        "/": {"GET": index},
        "/config_dump": {"GET": config_dump},
        "/logging": {"GET": get_logging, "POST": set_logging, "PUT": set_logging},
        "/quitquitquit": {"POST": quit_},
    }


def metrics_routes(registry: CollectorRegistry) -> Routes:
    def scrape(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, encoder(registry), content_type)

    return {"/metrics": {"GET": scrape}, "/stats/prometheus": {"GET": scrape}}


ReadinessCheck = Callable[[], Union[bool, Iterable[str]]]


class Readiness:
    """What still blocks readiness, by name (ztunnel's readiness blockers).

    ``Readiness("certificates", "mesh_state", "listeners")``; each part of the proxy calls
    ``ready(name)`` when its part is done. Calling the object returns what is still pending.
    """

    def __init__(self, *pending: str) -> None:
        self._pending = list(pending)

    def block(self, name: str) -> None:
        if name not in self._pending:
            self._pending.append(name)

    def ready(self, name: str) -> None:
        if name in self._pending:
            self._pending.remove(name)

    def __call__(self) -> List[str]:
        return list(self._pending)


def readiness_routes(check: ReadinessCheck) -> Routes:
    def ready(_: Request) -> Response:
        result = check()
        pending = ([] if result else ["not ready"]) if isinstance(result, bool) else list(result)
        if pending:
            return Response.text(503, "not ready: waiting for " + ", ".join(pending) + "\n")
        return Response.text(200, "ready\n")

    return {"/healthz/ready": {"GET": ready}}
