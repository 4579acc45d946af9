"""Connection telemetry: Istio's TCP metrics and one access-log line per connection.

``Telemetry`` is the data plane's ConnectionObserver (ztproxy.hooks): ``opened(ctx)`` counts the
connection and returns a tracker; the data plane calls ``add_sent``/``add_received`` as bytes flow
(the byte counters move while a long connection is still open, as ztunnel's do) and ``closed(failure)``
once at the end, which counts the close (and the failure), and writes the access-log line.

Metric names, labels and the "unknown" default are ztunnel's (``src/proxy/metrics.rs``;
``istio_tcp_connections_failed_total`` from ztunnel PR #1695). Byte directions follow Istio's
definitions for both reporters, as the data plane's trackers report them (ztproxy.proxy.copy):
``add_received(n)`` is the request direction, bytes received from the connection's client
(``istio_tcp_received_bytes_total``); ``add_sent(n)`` the response direction, bytes sent back to the
client (``istio_tcp_sent_bytes_total``). So for ``reporter="source"`` the received counter holds what
the source workload sent: Istio keeps request/response semantics for both reporters
(istio/istio#32399) and ztunnel's copy loop does the same. The access log, like ztunnel's, speaks from
the reporting workload's side instead: on the destination side ``bytes_recv`` is the request and
``bytes_sent`` the response; on the source side the two are swapped (the source sent the request).

A connection that ends with a failure (``closed(Failure(reason, detail))``, ztproxy.hooks) is counted
in ``istio_tcp_connections_failed_total`` too. Its close carries ztunnel's ``response_flags``, which the
failure's ``Reason`` maps to: ``DENY`` for an authorization denial, ``CONNECT`` for any other failure (as
ztunnel infers for an error without a flag), ``-`` for a connection that ended without error; the open
is always counted with ``-``, as ztunnel labels it before the outcome is known. The access log line of a
failure names the reason (``reason``) and the detail (``error``).

The families are a small custom collector rather than ``prometheus_client.Counter``: that class adds a
``*_created`` series to every counter, which ztunnel does not expose, and resolving a labelled child on
every read/write would cost more than the proxy's own work per chunk. A tracker resolves its series once,
when the connection opens, and then adds to plain integers.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ztproxy import __version__
from ztproxy.hooks import RESPONSE_FLAG_NONE, ConnContext, Failure

UNKNOWN = "unknown"
BUILD_COMPONENT = "ztproxy"

# ztunnel's CommonTrafficLabels, in its order.
TRAFFIC_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

_RESPONSE_FLAGS_INDEX = TRAFFIC_LABELS.index("response_flags")

ACCESS_LOGGER = "ztproxy.access"
ACCESS_LOG_FORMATS = ("text", "json")


# --------------------------------------------------------------------------------------------------
# Metric families


class _Cell:
    """One labelled series. Updated from the event loop thread only (the data plane is asyncio)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class CounterFamily:
    """A counter with labels, exposed as ``<name>_total`` with no ``_created`` series."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        if name.endswith("_total"):
            raise ValueError(f"counter {name}: give the name without _total (the exposition adds it)")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._cells: Dict[Tuple[str, ...], _Cell] = {}
        self._lock = threading.Lock()

    def cell(self, labelvalues: Sequence[str]) -> _Cell:
        key = tuple(labelvalues)
        found = self._cells.get(key)
        if found is not None:
            return found
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(key)}")
        with self._lock:  # creation only; the scrape may iterate from another thread
            return self._cells.setdefault(key, _Cell())

    def inc(self, labelvalues: Sequence[str], amount: int = 1) -> None:
        self.cell(labelvalues).inc(amount)

    def value(self, labelvalues: Sequence[str]) -> int:
        found = self._cells.get(tuple(labelvalues))
        return found.value if found is not None else 0

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            items = list(self._cells.items())
        for labels, cell in items:
            family.add_metric(labels, cell.value)
        return family


class _HistogramCell:
    __slots__ = ("counts", "total", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0
        self.sum = 0.0


class HistogramFamily:
    """A histogram with labels (cumulative buckets, ``_sum`` and ``_count``), no ``_created`` series."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._cells: Dict[Tuple[str, ...], _HistogramCell] = {}
        self._lock = threading.Lock()

    def observe(self, labelvalues: Sequence[str], value: float) -> None:
        key = tuple(labelvalues)
        cell = self._cells.get(key)
        if cell is None:
            with self._lock:
                cell = self._cells.setdefault(key, _HistogramCell(len(self.buckets)))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                cell.counts[i] += 1
                break
        cell.total += 1
        cell.sum += value

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            items = list(self._cells.items())
        for labels, cell in items:
            running = 0
            buckets: List[Tuple[str, float]] = []
            for bound, count in zip(self.buckets, cell.counts):
                running += count
                buckets.append((_float_text(bound), running))
            buckets.append(("+Inf", cell.total))
            family.add_metric(labels, buckets, cell.sum)
        return family


def _float_text(value: float) -> str:
    return repr(float(value))


class FamilyCollector:
    """Registers families with a CollectorRegistry (the registry asks collectors, not families)."""

    def __init__(self, families: Iterable[Any]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.collect()


# --------------------------------------------------------------------------------------------------
# Traffic metrics


class TrafficMetrics:
    """ztunnel's proxy metrics plus ``istio_build``, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, component: str = BUILD_COMPONENT, tag: str = __version__):
        self.opened = CounterFamily(
            "istio_tcp_connections_opened", "The total number of TCP connections opened", TRAFFIC_LABELS
        )
        self.closed = CounterFamily(
            "istio_tcp_connections_closed", "The total number of TCP connections closed", TRAFFIC_LABELS
        )
        self.failed = CounterFamily(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish or were denied",
            TRAFFIC_LABELS,
        )
        self.received_bytes = CounterFamily(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            TRAFFIC_LABELS,
        )
        self.sent_bytes = CounterFamily(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            TRAFFIC_LABELS,
        )
        self.build_labels = (component, tag)
        registry.register(
            FamilyCollector([self.opened, self.closed, self.failed, self.received_bytes, self.sent_bytes])
        )
        registry.register(_BuildCollector(component, tag))


class _BuildCollector:
    def __init__(self, component: str, tag: str) -> None:
        self._labels = [component, tag]

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("istio_build", "Istio component build info", labels=["component", "tag"])
        gauge.add_metric(self._labels, 1)
        yield gauge


def _field(obj: Any, name: str) -> str:
    value = getattr(obj, name, "") if obj is not None else ""
    return value if isinstance(value, str) else ""


def _or_unknown(value: Optional[str]) -> str:
    return value if value else UNKNOWN


def _workload_labels(workload: Any, principal: Optional[str]) -> Tuple[str, ...]:
    """workload, canonical service, canonical revision, namespace, principal, app, version, cluster.

    ztunnel reports the workload's ``workloadName``; ztmesh inventories often give only ``name``, so
    that is the fallback before "unknown".
    """
    name = _field(workload, "workload_name") or _field(workload, "name")
    canonical = _field(workload, "canonical_name")
    revision = _field(workload, "canonical_revision")
    return (
        _or_unknown(name),
        _or_unknown(canonical),
        _or_unknown(revision),
        _or_unknown(_field(workload, "namespace")),
        _or_unknown(principal),
        _or_unknown(canonical),
        _or_unknown(revision),
        _or_unknown(_field(workload, "cluster_id")),
    )


ServiceLookup = Callable[[str, Optional[str]], Any]


def traffic_labels(ctx: ConnContext, service_lookup: Optional[ServiceLookup] = None) -> Tuple[str, ...]:
    """The label values of TRAFFIC_LABELS for one connection."""
    src_principal = ctx.src_identity or _field(ctx.src_workload, "identity") or None
    dst_principal = ctx.dst_identity or _field(ctx.dst_workload, "identity") or None
    service_host = ctx.dst_service or ""
    service_name = service_namespace = ""
    if service_host and service_lookup is not None:
        service = service_lookup(service_host, _field(ctx.dst_workload, "namespace") or None)
        service_name, service_namespace = _field(service, "name"), _field(service, "namespace")
    return (
        ctx.reporter,
        *_workload_labels(ctx.src_workload, src_principal),
        _or_unknown(service_host),
        _or_unknown(service_namespace),
        _or_unknown(service_name),
        *_workload_labels(ctx.dst_workload, dst_principal),
        "tcp",
        RESPONSE_FLAG_NONE,  # at the open; the close may carry the failure's flag
        # ztunnel's SecurityPolicy has two values: mutual_tls and unknown (plaintext).
        "mutual_tls" if ctx.security_policy == "mutual_tls" else UNKNOWN,
    )


# --------------------------------------------------------------------------------------------------
# Access log


class AccessLogFormatter(logging.Formatter):
    """Renders access-log records as ``text`` (ztunnel's key=value line) or ``json`` (one object a line).

    Records of other loggers are rendered in the same two shapes, so one handler can serve the proxy.
    """

    def __init__(self, fmt: str = "text") -> None:
        super().__init__()
        if fmt not in ACCESS_LOG_FORMATS:
            raise ValueError(f"access log format {fmt!r}: expected one of {', '.join(ACCESS_LOG_FORMATS)}")
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        fields: Dict[str, Any] = getattr(record, "ztproxy_fields", None) or {}
        message = fields.get("_event") if fields else record.getMessage()
        scope = "access" if record.name == ACCESS_LOGGER else record.name
        if self.fmt == "json":
            data: Dict[str, Any] = {"time": stamp, "level": record.levelname.lower(), "scope": scope,
                                    "message": message}
            data.update((k, v) for k, v in fields.items() if not k.startswith("_"))
            if record.exc_info:
                data["exception"] = self.formatException(record.exc_info)
            return json.dumps(data, separators=(",", ":"))
        line = f"{stamp}\t{record.levelname.lower()}\t{scope}\t{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))  # quoted and escaped, as ztunnel's tracing output quotes strings


class AccessLog:
    """Writes one line per connection to the ``ztproxy.access`` logger (and one at open if asked)."""

    def __init__(self, log_open: bool = False, logger: Optional[logging.Logger] = None) -> None:
        self.log_open = log_open
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def write(self, event: str, fields: Dict[str, Any], level: int = logging.INFO) -> None:
        if not self.logger.isEnabledFor(level):
            return
        text = " ".join([event] + [f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None])
        self.logger.log(level, "%s", text, extra={"ztproxy_fields": {"_event": event, **fields}})


def configure_access_log(fmt: str = "text", stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Give the access logger its own handler and format (e.g. JSON lines for a log shipper), detached
    from the proxy's other logs. Returns the handler (remove it to undo)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessLogFormatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


# --------------------------------------------------------------------------------------------------
# The observer


class ConnectionTracker:
    """One connection: byte counters that move as data flows, and the close."""

    __slots__ = (
        "_telemetry", "ctx", "labels", "_request_cell", "_response_cell", "bytes_sent", "bytes_received",
        "started", "_closed",
    )

    def __init__(self, telemetry: Telemetry, ctx: ConnContext, labels: Tuple[str, ...]) -> None:
        self._telemetry = telemetry
        self.ctx = ctx
        self.labels = labels
        metrics = telemetry.metrics
        self._request_cell = metrics.received_bytes.cell(labels)
        self._response_cell = metrics.sent_bytes.cell(labels)
        self.bytes_received = 0  # from the client (request direction)
        self.bytes_sent = 0  # to the client (response direction)
        self.started = telemetry.clock()
        self._closed = False

    def add_received(self, n: int) -> None:
        """``n`` more bytes were received from the client (toward the destination)."""
        if n > 0:
            self.bytes_received += n
            self._request_cell.value += n

    def add_sent(self, n: int) -> None:
        """``n`` more bytes were sent back to the client (from the destination)."""
        if n > 0:
            self.bytes_sent += n
            self._response_cell.value += n

    def closed(self, failure: Optional[Failure] = None) -> None:
        """The connection ended; ``failure`` says why when it failed or was denied (its reason gives
        the close ztunnel's response flag, e.g. ``DENY``). Later calls are ignored."""
        if self._closed:
            return
        self._closed = True
        self._telemetry._finish(self, failure)


class Telemetry:
    """The ConnectionObserver: metrics and access logs for every proxied connection.

    ``service_lookup(hostname, namespace_hint)`` returns the service a client dialled (for the
    ``destination_service_name``/``_namespace`` labels); without it those labels stay "unknown".
    """

    def __init__(
        self,
        metrics: TrafficMetrics,
        access_log: Optional[AccessLog] = None,
        service_lookup: Optional[ServiceLookup] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log or AccessLog()
        self.service_lookup = service_lookup
        self.clock = clock

    def opened(self, conn: ConnContext) -> ConnectionTracker:
        labels = traffic_labels(conn, self.service_lookup)
        self.metrics.opened.inc(labels)
        tracker = ConnectionTracker(self, conn, labels)
        if self.access_log.log_open:
            self.access_log.write("connection opened", self._fields(tracker, None, with_totals=False))
        return tracker

    def _finish(self, tracker: ConnectionTracker, failure: Optional[Failure]) -> None:
        labels = tracker.labels
        if failure is not None:
            flag = failure.reason.response_flag
            labels = labels[:_RESPONSE_FLAGS_INDEX] + (flag,) + labels[_RESPONSE_FLAGS_INDEX + 1:]
        self.metrics.closed.inc(labels)
        if failure is not None:
            self.metrics.failed.inc(labels)
        event = "connection failed" if failure is not None else "connection complete"
        level = logging.WARNING if failure is not None else logging.INFO
        self.access_log.write(event, self._fields(tracker, failure, with_totals=True), level)

    def _fields(self, tracker: ConnectionTracker, failure: Optional[Failure],
                with_totals: bool) -> Dict[str, Any]:
        ctx = tracker.ctx
        fields: Dict[str, Any] = {
            "src.addr": _addr(ctx.src_ip, ctx.src_port),
            "src.workload": _field(ctx.src_workload, "name") or None,
            "src.namespace": _field(ctx.src_workload, "namespace") or None,
            "src.identity": ctx.src_identity,
            "dst.addr": _addr(ctx.dst_ip, ctx.dst_port),
            "dst.service": ctx.dst_service,
            "dst.workload": _field(ctx.dst_workload, "name") or None,
            "dst.namespace": _field(ctx.dst_workload, "namespace") or None,
            "dst.identity": ctx.dst_identity,
            "direction": ctx.direction,
            "protocol": ctx.protocol,
        }
        if with_totals:
            # From the reporting workload's side, as ztunnel logs it: the source sent the request.
            source_side = ctx.reporter == "source"
            fields["bytes_recv"] = tracker.bytes_sent if source_side else tracker.bytes_received
            fields["bytes_sent"] = tracker.bytes_received if source_side else tracker.bytes_sent
            fields["duration_ms"] = round((self.clock() - tracker.started) * 1000.0, 3)
            fields["reason"] = failure.reason.value if failure is not None else None
            fields["error"] = str(failure) if failure is not None else None
        return fields


def _addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def service_lookup_from(state_provider: Callable[[], Any]) -> ServiceLookup:
    """A service_lookup over the current mesh state (ztproxy.state.MeshState): by hostname, preferring
    the destination workload's namespace when several namespaces define the hostname (ServiceEntry)."""

    def lookup(hostname: str, namespace: Optional[str]) -> Any:
        state = state_provider()
        found = None
        for service in getattr(state, "services", ()) or ():
            if service.hostname != hostname:
                continue
            if namespace is None or service.namespace == namespace:
                return service
            found = found or service
        return found

    return lookup


def new_registry() -> CollectorRegistry:
    """The proxy's own registry (not prometheus_client's global one), with the process metrics."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry
