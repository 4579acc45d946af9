"""Outbound route choice: HBONE to mesh workloads, service VIP load balancing, passthrough."""

from __future__ import annotations

from types import SimpleNamespace

from ztproxy.config import settings_from_dict
from ztproxy.proxy.outbound import EndpointPicker, OutboundHandler
from ztproxy.state import parse_mesh_state

STATE = parse_mesh_state({
    "workloads": [
        {"name": f"api-{i}", "namespace": "d", "workloadIps": [f"10.2.0.{i}"], "protocol": "HBONE",
         "node": "b", "services": {"d/api.d": {80: 8080}}} for i in (1, 2, 3)
    ] + [{"name": "legacy", "namespace": "d", "workloadIps": ["10.3.0.1"], "protocol": "TCP", "node": "c"}],
    "services": [{"name": "api", "namespace": "d", "hostname": "api.d", "vips": ["/10.96.0.1"],
                  "ports": {80: 8080}}],
}, "cluster.local")


def _handler(cooldown: float = 30) -> OutboundHandler:
    settings = settings_from_dict({"node_name": "a", "endpoint_failure_cooldown": cooldown})
    return OutboundHandler(SimpleNamespace(settings=settings))


def test_hbone_workload_and_passthrough_routes() -> None:
    handler = _handler()
    routes, service = handler.routes(STATE, "10.2.0.2", 9000)
    assert service is None and len(routes) == 1
    assert routes[0].target == ("10.2.0.2", 9000) and routes[0].hbone_addr == ("10.2.0.2", 15008)
    routes, _ = handler.routes(STATE, "10.3.0.1", 22)  # a TCP workload: plain TCP
    assert routes[0].hbone_addr is None and routes[0].workload.name == "legacy"
    routes, _ = handler.routes(STATE, "192.0.2.7", 443)  # outside the mesh: passthrough
    assert routes[0].hbone_addr is None and routes[0].workload is None
    routes, _ = handler.routes(STATE, "10.96.0.1", 443)  # VIP, but not a service port: passthrough
    assert routes[0].hbone_addr is None


def test_service_vip_round_robin_skips_failed_endpoints() -> None:
    handler = _handler()
    firsts = []
    for _ in range(6):
        routes, service = handler.routes(STATE, "10.96.0.1", 80)
        assert service == "api.d"
        assert all(r.target[1] == 8080 and r.hbone_addr == (r.target[0], 15008) for r in routes)
        firsts.append(routes[0].target[0])
    assert sorted(set(firsts)) == ["10.2.0.1", "10.2.0.2", "10.2.0.3"]
    assert firsts[:3] == firsts[3:]  # strict rotation
    handler.picker.failed("10.2.0.2", 8080)
    for _ in range(6):
        routes, _ = handler.routes(STATE, "10.96.0.1", 80)
        assert "10.2.0.2" not in [r.target[0] for r in routes]


def test_all_failed_endpoints_are_still_tried() -> None:
    picker = EndpointPicker(cooldown=30)
    candidates = [("10.0.0.1", 80, None), ("10.0.0.2", 80, None)]
    for ip, port, _ in candidates:
        picker.failed(ip, port)
    assert len(picker.order(("svc", 80), candidates)) == 2
    picker.succeeded("10.0.0.1", 80)
    assert [c[0] for c in picker.order(("svc", 80), candidates)] == ["10.0.0.1"]
