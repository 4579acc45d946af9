"""One settings file, one config module: every key of ``ztproxy run`` (data plane, listeners, DNS, access
log, CA renewal, revocation) is validated by ztproxy.config, the reference in docs/ztproxy.md lists
every key with its real default, and the pieces the wiring adds (policy validation in the mesh state,
ztunnel's DENY flag, the access log's byte direction) behave as documented."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from ztproxy.config import (
    _SECTIONS,
    _TOP_KEYS,
    ConfigError,
    Settings,
    settings_from_dict,
    settings_to_dict,
)
from ztproxy.hooks import ConnContext, Failure, Reason
from ztproxy.state import MeshStateError, parse_mesh_state
from ztproxy.telemetry import (
    ACCESS_LOGGER,
    TRAFFIC_LABELS,
    AccessLog,
    Telemetry,
    TrafficMetrics,
    new_registry,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "ztproxy.md"


def documented_settings() -> dict:
    """The YAML block of the "Settings file" section of docs/ztproxy.md."""
    text = DOC.read_text()
    section = text[text.index("## Settings file"):text.index("## Mesh state")]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return yaml.safe_load(block)


def test_the_reference_lists_every_key_with_its_real_default() -> None:
    documented = documented_settings()
    assert set(documented) == set(_TOP_KEYS) | set(_SECTIONS)
    for name, (_, checkers) in _SECTIONS.items():
        assert set(documented[name]) == set(checkers), name
    # parsed, the documented file is exactly the defaults (only node_name is required)
    assert settings_from_dict(documented) == settings_from_dict({"node_name": documented["node_name"]})


def test_the_settings_dump_is_itself_a_valid_settings_file() -> None:
    settings = settings_from_dict({
        "node_name": "vm-1",
        "listen": {"admin": "[::1]:15000", "dns": None, "outbound": "10.0.0.1:0"},
        "dns": {"upstreams": ["192.0.2.53", "[2001:db8::53]:5353"], "search_domains": ["corp.example"]},
        "access_log": {"format": "json"},
        "ca": {"addresses": ["istiod.istio-system.svc", "10.0.0.5:15012"],
               "server_name": "istiod.istio-system.svc", "token_file": "/var/run/ztproxy/token",
               "cert_ttl": 3600, "renew_fraction": 0.6},
        "revocation": {"deny_list": "/etc/ztproxy/deny-list.yaml", "crls": ["/etc/ztproxy/ca.crl"]},
    })
    dumped = settings_to_dict(settings)
    assert dumped["listen"]["admin"] == "[::1]:15000"
    assert dumped["ca"]["addresses"][0] == "istiod.istio-system.svc:15012"
    assert settings_from_dict(yaml.safe_load(yaml.safe_dump(dumped))) == settings
    assert settings.ca.addresses == (("istiod.istio-system.svc", 15012), ("10.0.0.5", 15012))
    assert settings.revocation.enabled and not Settings(node_name="x").revocation.enabled


@pytest.mark.parametrize("data, words", [
    ({"listen": {"metrics": "0.0.0.0:15000"}}, ["'listen.metrics'", "collides with 'listen.admin'"]),
    ({"listen": {"dns": "[::]:15008"}}, ["'listen.dns'", "'listen.inbound'"]),
    ({"dns": {"upstreams": ["127.0.0.1:15053"]}}, ["dns.upstreams[0]", "DNS proxy's own address"]),
    ({"dns": {"domain": "cluster local"}}, ["'dns.domain'", "a DNS name"]),
    ({"ca": {"addresses": ["10.0.0.5:0"]}}, ["'ca.addresses[0]'", "HOST:PORT"]),
    ({"ca": {"identity": "cluster.local/ns/x/sa/y"}}, ["'ca.identity'", "spiffe://"]),
    ({"ca": {"renew_fraction": 1}}, ["'ca.renew_fraction'", "from 0.1 to 0.9"]),
    ({"ca": {"token_file": "token"}}, ["'ca.token_file'", "absolute path"]),
    ({"ca": {"adresses": []}}, ["'ca.adresses' is unknown", "ca.addresses"]),
    ({"revocation": {"crls": ["relative.crl"]}}, ["'revocation.crls[0]'", "absolute path"]),
    ({"revocation": []}, ["'revocation'", "a mapping with the keys deny_list, crls"]),
    ({"services": {"admin": "127.0.0.1:15000"}}, ["'services' is unknown", "listen"]),
])
def test_bad_values_name_the_key_and_what_to_write(data, words) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(dict(node_name="n", **data))
    for word in words:
        assert word in str(err.value)


def test_port_zero_listeners_never_collide() -> None:
    listen = {name: "127.0.0.1:0" for name in ("outbound", "inbound", "inbound_plaintext", "dns", "admin",
                                                "metrics", "readiness")}
    assert settings_from_dict({"node_name": "n", "listen": listen}).listen.admin == ("127.0.0.1", 0)


MESH = {"workloads": [{"name": "api", "namespace": "backend", "workloadIps": ["10.0.0.2"], "node": "n"}]}
ALLOW = {"name": "allow", "namespace": "backend", "scope": "Namespace", "action": "Allow", "rules": []}


def test_the_mesh_state_is_refused_as_a_whole_for_one_bad_policy() -> None:
    state = parse_mesh_state(dict(MESH, policies=[ALLOW]), "cluster.local")
    assert sorted(state.policy_index.by_key) == ["backend/allow"]
    with pytest.raises(MeshStateError, match=r"policy backend/oops \(policies\[1\]\)\.action: .*Audit"):
        parse_mesh_state(dict(MESH, policies=[ALLOW, dict(ALLOW, name="oops", action="Audit")]),
                         "cluster.local")
    with pytest.raises(MeshStateError, match="policy backend/allow is defined twice"):
        parse_mesh_state(dict(MESH, policies=[ALLOW, ALLOW]), "cluster.local")


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
