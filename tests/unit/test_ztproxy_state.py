"""Mesh state in ztunnel's local-config format, and its reload."""

from __future__ import annotations

import logging
import os
import textwrap

import pytest

from ztproxy.state import MeshStateError, MeshStateWatcher, parse_mesh_state

ZTUNNEL_STYLE = textwrap.dedent("""\
    workloads:
    - uid: cluster1//v1/Pod/default/web-0
      name: web-0
      namespace: default
      serviceAccount: web
      workloadIps: ["10.1.0.2"]
      protocol: HBONE
      node: node-a
      workloadName: web
      workloadType: deployment
      canonicalName: web
      canonicalRevision: v1
      clusterId: cluster1
      status: Healthy
      services:
        default/api.default.svc.cluster.local:
          80: 8080
    - name: api-0
      namespace: default
      serviceAccount: api
      workloadIps: ["10.2.0.2"]
      protocol: HBONE
      node: node-b
      trustDomain: example.org
      services:
        default/api.default.svc.cluster.local:
          80: 8081
    - name: legacy
      namespace: other
      workloadIps: ["10.3.0.2"]
      node: node-b
    services:
    - name: api
      namespace: default
      hostname: api.default.svc.cluster.local
      vips: ["/10.96.0.10"]
      ports: {80: 8080}
    policies:
    - name: allow-web
      namespace: default
      scope: Namespace
      action: Allow
      rules: []
    """)


def test_ztunnel_local_config_parses() -> None:
    import yaml

    state = parse_mesh_state(yaml.safe_load(ZTUNNEL_STYLE), "cluster.local")
    web = state.workload_by_ip("10.1.0.2")
    assert web.uid == "cluster1//v1/Pod/default/web-0"
    assert web.identity == "spiffe://cluster.local/ns/default/sa/web"
    assert web.uses_hbone and web.node == "node-a"
    api = state.workload_by_ip("10.2.0.2")
    assert api.identity == "spiffe://example.org/ns/default/sa/api"
    assert api.uid == "default/api-0"  # derived when the file gives none
    legacy = state.workload_by_ip("10.3.0.2")
    assert legacy.protocol == "TCP" and legacy.service_account == "default"
    assert state.local_workload_by_ip("10.1.0.2", "node-a") is web
    assert state.local_workload_by_ip("10.1.0.2", "node-b") is None
    service = state.service_by_vip("10.96.0.10")
    assert service.hostname == "api.default.svc.cluster.local"
    endpoints = state.service_endpoints(service, 80)
    # The workloads' own port maps win over the service's (ztunnel's LocalWorkload.services).
    assert sorted((w.name, port) for w, port in endpoints) == [("api-0", 8081), ("web-0", 8080)]
    assert state.policies[0]["name"] == "allow-web"


def test_unhealthy_endpoints_are_skipped() -> None:
    state = parse_mesh_state({
        "workloads": [{"name": "a", "namespace": "d", "workloadIps": ["10.0.0.1"], "status": "Unhealthy",
                       "services": {"d/s.d": {80: 80}}},
                      {"name": "b", "namespace": "d", "workloadIps": ["10.0.0.2"],
                       "services": {"d/s.d": {80: 80}}}],
        "services": [{"name": "s", "namespace": "d", "hostname": "s.d", "vips": ["/10.96.0.1"],
                      "ports": {80: 80}}]}, "cluster.local")
    assert [w.name for w, _ in state.service_endpoints(state.services[0], 80)] == ["b"]


@pytest.mark.parametrize("doc, words", [
    ({"workloads": [{"name": "x", "namespace": "d", "workloadIps": ["10.0.0"]}]},
     ["workloads[0] (name 'x')", "workloadIps[0]", "'10.0.0'", "IP address"]),
    ({"workloads": [{"name": "x"}]}, ["workloads[0] (name 'x')", "'namespace' is required"]),
    ({"workloads": [{"name": "x", "namespace": "d", "protocol": "QUIC"}]}, ["'protocol'", "TCP, HBONE"]),
    ({"workloads": [{"name": "x", "namespace": "d", "workloadIP": "10.0.0.1"}]},
     ["unknown key(s) workloadIP", "workloadIps"]),
    ({"services": [{"namespace": "d", "hostname": "h", "vips": ["10.0.0.x"]}]}, ["vips[0]", "IP address"]),
    ({"services": [{"namespace": "d", "hostname": "h", "ports": {80: 70000}}]}, ["ports.80", "70000"]),
    ({"workloads": [{"uid": "u", "name": "a", "namespace": "d"},
                    {"uid": "u", "name": "b", "namespace": "d"}]},
     ["uid 'u'", "unique"]),
    ({"workload": []}, ["unknown key(s) workload"]),
    ({"workloads": {"a": 1}}, ["'workloads' must be a list"]),
])
def test_bad_mesh_state_is_named(doc, words) -> None:
    with pytest.raises(MeshStateError) as err:
        parse_mesh_state(doc, "cluster.local")
    for word in words:
        assert word in str(err.value)


def test_watcher_reloads_on_atomic_replace_and_keeps_state_on_bad_file(tmp_path, caplog) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("workloads:\n- {name: a, namespace: d, workloadIps: [10.0.0.1]}\n")
    watcher = MeshStateWatcher(str(path), "cluster.local")
    assert watcher.current.workload_by_ip("10.0.0.1").name == "a"
    assert watcher.poll() is False  # unchanged

    tmp = tmp_path / "state.yaml.new"
    tmp.write_text("workloads:\n- {name: b, namespace: d, workloadIps: [10.0.0.2]}\n")
    os.replace(tmp, path)
    assert watcher.poll() is True
    assert watcher.current.workload_by_ip("10.0.0.2").name == "b"
    assert watcher.current.workload_by_ip("10.0.0.1") is None

    tmp.write_text("workloads:\n- {name: c, namespace: d, workloadIps: [not-an-ip]}\n")
    os.replace(tmp, path)
    with caplog.at_level(logging.ERROR, logger="ztproxy.state"):
        assert watcher.poll() is False
    assert "rejected the new mesh state" in caplog.text and "not-an-ip" in caplog.text
    assert watcher.current.workload_by_ip("10.0.0.2").name == "b"  # previous state kept


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
