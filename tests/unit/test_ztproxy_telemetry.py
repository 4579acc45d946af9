"""Istio TCP metrics and access logs: real bytes through a relay that reports to the trackers, scraped
over real HTTP from the metrics server and read back with prometheus_client's own text parsers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import urllib.request
from typing import Any, Dict, List, Optional

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from ztproxy import __version__
from ztproxy.admin import HttpServer, metrics_routes
from ztproxy.hooks import ConnContext, Failure, Reason
from ztproxy.state import parse_mesh_state
from ztproxy.telemetry import (
    ACCESS_LOGGER,
    TRAFFIC_LABELS,
    AccessLog,
    AccessLogFormatter,
    Telemetry,
    TrafficMetrics,
    configure_access_log,
    new_registry,
    service_lookup_from,
)

pytestmark = pytest.mark.timeout(60)

STATE = parse_mesh_state({
    "workloads": [
        {"uid": "c", "name": "client-1", "namespace": "front", "serviceAccount": "client",
         "workloadName": "client", "canonicalName": "client-app", "canonicalRevision": "v1",
         "workloadIps": ["10.0.0.1"], "protocol": "HBONE", "node": "a", "clusterId": "vm-east"},
        {"uid": "s", "name": "server-1", "namespace": "back", "serviceAccount": "server",
         "workloadIps": ["10.0.0.2"], "protocol": "HBONE", "node": "b"},
    ],
    "services": [
        {"name": "api", "namespace": "back", "hostname": "api.back.svc.cluster.local",
         "vips": ["/10.96.0.1"], "ports": {80: 8080}},
    ],
}, "cluster.local")
CLIENT, SERVER = STATE.workloads

EXPECTED_LABELS = {
    "reporter": "destination",
    "source_workload": "client",
    "source_canonical_service": "client-app",
    "source_canonical_revision": "v1",
    "source_workload_namespace": "front",
    "source_principal": "spiffe://cluster.local/ns/front/sa/client",
    "source_app": "client-app",
    "source_version": "v1",
    "source_cluster": "vm-east",
    "destination_service": "api.back.svc.cluster.local",
    "destination_service_namespace": "back",
    "destination_service_name": "api",
    "destination_workload": "server-1",  # no workloadName: ztmesh falls back to the name
    "destination_canonical_service": "unknown",
    "destination_canonical_revision": "unknown",
    "destination_workload_namespace": "back",
    "destination_principal": "spiffe://cluster.local/ns/back/sa/server",
    "destination_app": "unknown",
    "destination_version": "unknown",
    "destination_cluster": "unknown",
    "request_protocol": "tcp",
    "response_flags": "-",
    "connection_security_policy": "mutual_tls",
}


def context(dst_port: int, **overrides: Any) -> ConnContext:
    values: Dict[str, Any] = dict(
        direction="inbound", reporter="destination", src_ip="10.0.0.1", src_port=40000, dst_ip="10.0.0.2",
        dst_port=dst_port, src_identity=CLIENT.identity, dst_identity=SERVER.identity, src_workload=CLIENT,
        dst_workload=SERVER, dst_service="api.back.svc.cluster.local", protocol="HBONE",
        security_policy="mutual_tls")
    values.update(overrides)
    return ConnContext(**values)


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Relay:
    """A TCP relay on loopback that reports every chunk it copies to a connection tracker, as the data
    plane does, in front of an echo server that answers each chunk doubled."""

    def __init__(self, telemetry: Telemetry, make_ctx) -> None:
        self.telemetry = telemetry
        self.make_ctx = make_ctx
        self.trackers: List[Any] = []

    async def start(self) -> int:
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data * 2)
                await writer.drain()
            writer.close()

        self.echo = await asyncio.start_server(echo, "127.0.0.1", 0)
        echo_port = self.echo.sockets[0].getsockname()[1]

        async def relay(reader, writer):
            tracker = self.telemetry.opened(self.make_ctx())
            self.trackers.append(tracker)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", echo_port)

            async def pump(src, dst, add):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    add(len(data))
                if dst.can_write_eof():
                    dst.write_eof()

            # as the data plane: bytes from the client are "received", bytes back to it "sent"
            await asyncio.gather(pump(reader, up_writer, tracker.add_received),
                                 pump(up_reader, writer, tracker.add_sent))
            writer.close()
            up_writer.close()
            tracker.closed(None)

        self.server = await asyncio.start_server(relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in (self.server, self.echo):
            server.close()
            await server.wait_closed()


def scrape(port: int, path: str = "/metrics", accept: Optional[str] = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers.get("Content-Type"), response.read().decode()


def samples(text: str, parser=text_string_to_metric_families) -> Dict[str, List[Any]]:
    out: Dict[str, List[Any]] = {}
    for family in parser(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


@pytest.fixture
def env():
    loop = Loop()
    registry = new_registry()
    metrics = TrafficMetrics(registry)
    telemetry = Telemetry(metrics, AccessLog(), service_lookup_from(lambda: STATE))
    server = HttpServer("metrics", metrics_routes(registry))
    loop.run(server.start("127.0.0.1", 0))
    yield loop, telemetry, server.port
    loop.run(server.close())
    loop.close()


def test_metrics_over_http_follow_real_traffic(env, caplog):
    loop, telemetry, metrics_port = env
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    relay = Relay(telemetry, lambda: context(8080))
    relay_port = loop.run(relay.start())

    async def client_session(probe):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
        writer.write(b"x" * 1000)
        await writer.drain()
        assert await reader.readexactly(2000) == b"x" * 2000
        await probe()  # the connection is still open here
        writer.write(b"y" * 500)
        writer.write_eof()
        assert await reader.read() == b"y" * 1000
        writer.close()

    mid: Dict[str, Any] = {}

    async def probe():
        mid["text"] = await asyncio.get_running_loop().run_in_executor(None, scrape, metrics_port)

    loop.run(client_session(probe))
    loop.run(asyncio.sleep(0.1))  # let the relay record the close

    during = samples(mid["text"][1])
    assert during["istio_tcp_connections_opened_total"][0].value == 1
    assert "istio_tcp_connections_closed_total" not in during
    # bytes counted while the connection was open: request 1000 (client->server), response 2000
    assert during["istio_tcp_received_bytes_total"][0].value == 1000
    assert during["istio_tcp_sent_bytes_total"][0].value == 2000

    content_type, text = scrape(metrics_port)
    assert content_type.startswith("text/plain")
    after = samples(text)
    for name, value in (("istio_tcp_connections_opened_total", 1), ("istio_tcp_connections_closed_total", 1),
                        ("istio_tcp_received_bytes_total", 1500), ("istio_tcp_sent_bytes_total", 3000)):
        (sample,) = after[name]
        assert sample.value == value, name
        assert sample.labels == EXPECTED_LABELS, name
    assert "istio_tcp_connections_failed_total" not in after
    assert after["istio_build"][0].labels == {"component": "ztproxy", "tag": __version__}
    assert "process_resident_memory_bytes" in after
    assert "_created" not in text  # ztunnel exposes no *_created series

    # one access-log line at completion, with both byte counts
    (line,) = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert line.startswith("connection complete ")
    for part in ('src.addr="10.0.0.1:40000"', 'src.workload="client-1"', 'src.namespace="front"',
                 f'src.identity="{CLIENT.identity}"', 'dst.addr="10.0.0.2:8080"', 'dst.workload="server-1"',
                 'dst.service="api.back.svc.cluster.local"', 'direction="inbound"', "bytes_recv=1500",
                 "bytes_sent=3000", "duration_ms="):
        assert part in line
    loop.run(relay.stop())


def test_failed_and_plaintext_connections(env, caplog):
    loop, telemetry, metrics_port = env
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    denied = telemetry.opened(context(9090, src_identity=None, security_policy="none", protocol="TCP",
                                      dst_service=None, src_workload=None))
    denied.closed(Failure(Reason.DENIED, "denied: no ALLOW policy matches (applicable: back/allow-front)"))
    denied.closed(Failure(Reason.CONNECTION_LOST, "again"))  # a second close is ignored
    (family,) = [f for f in text_string_to_metric_families(scrape(metrics_port)[1])
                 if f.name == "istio_tcp_connections_failed"]
    (sample,) = family.samples
    assert sample.value == 1
    assert sample.labels["response_flags"] == "DENY"
    assert sample.labels["connection_security_policy"] == "unknown"  # ztunnel's value for plaintext
    assert sample.labels["source_principal"] == "unknown"
    assert sample.labels["source_workload"] == "unknown"
    assert sample.labels["destination_service"] == "unknown"
    (record,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("connection failed ")
    assert 'error="denied: no ALLOW policy matches (applicable: back/allow-front)"' in record.getMessage()
    assert 'reason="denied"' in record.getMessage()
    assert "src.identity" not in record.getMessage()  # absent values are left out, not "None"


def test_both_paths_and_openmetrics(env):
    loop, telemetry, metrics_port = env
    telemetry.opened(context(1)).closed(None)
    _, text = scrape(metrics_port, "/stats/prometheus")
    assert samples(text)["istio_tcp_connections_closed_total"][0].value == 1
    content_type, text = scrape(metrics_port, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert samples(text, openmetrics_families)["istio_tcp_connections_opened_total"][0].value == 1


def test_counter_names_are_exactly_istios():
    registry = new_registry()
    TrafficMetrics(registry)
    names = {f.name for f in registry.collect()}
    assert {"istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_connections_failed",
            "istio_tcp_sent_bytes", "istio_tcp_received_bytes", "istio_build"} <= names
    assert len(TRAFFIC_LABELS) == 23


def test_json_access_log_and_open_lines():
    stream = io.StringIO()
    handler = configure_access_log("json", stream)
    logger = logging.getLogger(ACCESS_LOGGER)
    try:
        registry = new_registry()
        telemetry = Telemetry(TrafficMetrics(registry), AccessLog(log_open=True))
        tracker = telemetry.opened(context(8080))
        tracker.add_received(10)
        tracker.add_sent(20)
        tracker.closed(None)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    opened, complete = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert opened["message"] == "connection opened" and "bytes_sent" not in opened
    assert complete["message"] == "connection complete" and complete["scope"] == "access"
    assert complete["bytes_recv"] == 10 and complete["bytes_sent"] == 20
    assert complete["src.identity"] == CLIENT.identity and complete["dst.workload"] == "server-1"
    assert complete["error"] is None and complete["reason"] is None and complete["level"] == "info"
    assert complete["time"].endswith("Z")


def test_access_log_formatter_rejects_unknown_format():
    with pytest.raises(ValueError, match="expected one of text, json"):
        AccessLogFormatter("xml")


# ----------------------------------------------------------------- byte direction and response flags

def _ctx(reporter: str) -> ConnContext:
    inbound = reporter == "destination"
    return ConnContext(direction="inbound" if inbound else "outbound", reporter=reporter, src_ip="10.0.0.1",
                       src_port=40000, dst_ip="10.0.0.2", dst_port=8080,
                       src_identity="spiffe://cluster.local/ns/a/sa/web",
                       dst_identity="spiffe://cluster.local/ns/b/sa/api", src_workload=None,
                       dst_workload=None, dst_service=None, protocol="HBONE", security_policy="mutual_tls")


@pytest.mark.parametrize("reporter, log_sent, log_recv", [("source", 100, 7), ("destination", 7, 100)])
def test_bytes_metrics_follow_istio_and_the_log_the_reporting_workload(reporter, log_sent, log_recv,
                                                                      caplog) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    metrics = TrafficMetrics(new_registry())
    tracker = Telemetry(metrics, AccessLog()).opened(_ctx(reporter))
    tracker.add_received(100)  # the client sent the request
    tracker.add_sent(7)  # the server answered
    tracker.closed(None)
    labels = tracker.labels
    assert labels[0] == reporter
    # metrics: request/response for both reporters (Istio's definitions, ztunnel's copy loop)
    assert metrics.received_bytes.value(labels) == 100 and metrics.sent_bytes.value(labels) == 7
    # access log: from the reporting workload's side (the source sent the request)
    (line,) = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert f"bytes_recv={log_recv} bytes_sent={log_sent}" in line


def test_other_failures_close_with_ztunnels_connect_flag() -> None:
    metrics = TrafficMetrics(new_registry())
    tracker = Telemetry(metrics, AccessLog()).opened(_ctx("source"))
    tracker.closed(Failure(Reason.CONNECT_FAILED, "connect failed: [Errno 111] Connection refused"))
    flag = TRAFFIC_LABELS.index("response_flags")
    failed = tracker.labels[:flag] + ("CONNECT",) + tracker.labels[flag + 1:]
    assert metrics.closed.value(failed) == 1 and metrics.failed.value(failed) == 1
    assert metrics.closed.value(tracker.labels) == 0
    ok = Telemetry(metrics, AccessLog()).opened(_ctx("source"))
    ok.closed()
    assert metrics.closed.value(ok.labels) == 1 and ok.labels[flag] == "-"


def test_a_denial_closes_with_ztunnels_deny_flag_and_opens_without_it() -> None:
    metrics = TrafficMetrics(new_registry())
    tracker = Telemetry(metrics, AccessLog()).opened(_ctx("destination"))
    tracker.closed(Failure(Reason.DENIED, "denied: no ALLOW policy matches"))
    flag = TRAFFIC_LABELS.index("response_flags")
    denied = tracker.labels[:flag] + ("DENY",) + tracker.labels[flag + 1:]
    assert tracker.labels[flag] == "-" and metrics.opened.value(tracker.labels) == 1
    assert metrics.closed.value(denied) == 1 and metrics.failed.value(denied) == 1
    assert metrics.closed.value(tracker.labels) == 0 and metrics.failed.value(tracker.labels) == 0
