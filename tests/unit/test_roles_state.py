"""The mesh state rendered from the inventory (module_utils/ztmesh_mesh_state.py) is ztunnel's
local config format, and ztproxy's own loaders accept it: the mesh state parser, the authorizer and
the identity service's placement reader. Policies rendered from the inventory decide connections as
the inventory says."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_inventory as inventory
from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_mesh_state as renderer
from ztproxy.authz import Connection, PolicyIndex
from ztproxy.identity.meshstate import parse_placements
from ztproxy.state import parse_mesh_state

REPO = Path(__file__).resolve().parents[2]




def example_hostvars() -> Dict[str, Dict[str, Any]]:
    data = yaml.safe_load((REPO / "playbooks/inventory/example.yml").read_text())
    group = data["all"]["children"]["ztmesh_nodes"]
    return {host: {**copy.deepcopy(group["vars"]), **copy.deepcopy(hv)}
            for host, hv in group["hosts"].items()}


def render(hostvars: Dict[str, Dict[str, Any]], order=None) -> str:
    """As the role writes it: the sealed file (YAML framed by its seal lines, keys sorted)."""
    fleet = inventory.build_fleet(hostvars, order or list(hostvars))
    assert fleet["errors"] == []
    return renderer.mesh_state_file(fleet)


def test_rendered_state_is_ztunnel_local_config_that_ztproxy_loads() -> None:
    text = render(example_hostvars())
    data = yaml.safe_load(text)
    assert set(data) == {"workloads", "services", "policies"}
    state = parse_mesh_state(data, "cluster.local")
    assert state.warnings == []
    by_name = {w.name: w for w in state.workloads}
    assert sorted(by_name) == ["batch.node3", "db.node3", "web.node1", "web.node2"]
    web1 = by_name["web.node1"]
    assert web1.uid == "ztmesh//networking.istio.io/WorkloadEntry/shop/web.node1"
    assert (web1.node, web1.namespace, web1.service_account) == ("node1", "shop", "web")
    assert web1.protocol == "HBONE"
    assert web1.workload_ips == ("10.20.0.11",)
    assert web1.identity == "spiffe://cluster.local/ns/shop/sa/web"
    assert by_name["db.node3"].authorization_policies == ("shop/db-from-web-only",)
    # Services: VIP in ztunnel's network/IP form, endpoints from the workloads' services maps.
    web = state.service_by_vip("10.96.0.10")
    assert web is not None and web.hostname == "web.shop.svc.cluster.local" and dict(web.ports) == {80: 8080}
    endpoints = state.service_endpoints(web, 80)
    assert sorted((w.name, port) for w, port in endpoints) == [("web.node1", 8080), ("web.node2", 8080)]
    db = next(s for s in state.services if s.name == "db")
    assert db.vips == () and db.subject_alt_names == ("spiffe://cluster.local/ns/shop/sa/db",)
    # Local workloads per node, as each proxy selects them by its node_name.
    assert [w.name for w in state.local_workloads("node3")] == ["batch.node3", "db.node3"]


def test_identity_service_reads_the_placements() -> None:
    placements = parse_placements(render(example_hostvars()), "cluster.local")
    assert {str(i) for i in placements["node3"]} == {"spiffe://cluster.local/ns/shop/sa/batch",
                                                      "spiffe://cluster.local/ns/shop/sa/db"}
    assert {str(i) for i in placements["node1"]} == {"spiffe://cluster.local/ns/shop/sa/web"}


def test_policies_decide_as_the_inventory_says() -> None:
    data = yaml.safe_load(render(example_hostvars()))
    index = PolicyIndex.from_raw(data["policies"])
    db_keys = ["shop/db-from-web-only"]
    web_id = "spiffe://cluster.local/ns/shop/sa/web"
    batch_id = "spiffe://cluster.local/ns/shop/sa/batch"
    def to_db(src: str, port: int, identity: str) -> bool:
        return index.evaluate(Connection.of(src, "10.244.3.10", port, identity), "shop", db_keys).allowed

    # db allows only the web identity, on 5432.
    assert to_db("10.20.0.11", 5432, web_id)
    assert not to_db("10.20.0.13", 5432, batch_id)
    assert not to_db("10.20.0.11", 22, web_id)
    # The namespace-wide DENY refuses the legacy subnet everywhere in shop, identity or not.
    assert not index.evaluate(Connection.of("10.20.99.7", "10.20.0.11", 8080, batch_id), "shop").allowed
    assert index.evaluate(Connection.of("10.20.0.13", "10.20.0.11", 8080, batch_id), "shop").allowed


def test_rendering_is_deterministic_and_independent_of_host_order() -> None:
    hostvars = example_hostvars()
    first = render(hostvars)
    assert render(hostvars) == first
    assert render(hostvars, order=list(reversed(list(hostvars)))) == first


def test_removing_a_node_removes_it_from_everyone_s_state() -> None:
    hostvars = example_hostvars()
    del hostvars["node2"]
    data = yaml.safe_load(render(hostvars))
    assert all(w["node"] != "node2" for w in data["workloads"])
    state = parse_mesh_state(data, "cluster.local")
    web = state.service_by_vip("10.96.0.10")
    assert [w.name for w, _ in state.service_endpoints(web, 80)] == ["web.node1"]


def test_node_name_and_network_reach_the_state() -> None:
    hostvars = example_hostvars()
    for host in hostvars.values():
        host["ztmesh_network"] = "dc1"
    hostvars["node1"]["ztmesh_node_name"] = "vm-001.example.com"
    data = yaml.safe_load(render(hostvars))
    web1 = next(w for w in data["workloads"] if w["workloadIps"] == ["10.20.0.11"])
    assert web1["node"] == "vm-001.example.com" and web1["network"] == "dc1"
    assert web1["name"] == "web.vm-001.example.com"
    web = next(s for s in data["services"] if s["name"] == "web")
    assert web["vips"] == ["dc1/10.96.0.10"]


def test_a_fleet_with_errors_is_never_rendered() -> None:
    hostvars = example_hostvars()
    hostvars["node1"]["ztmesh_workloads"][0]["addresses"] = ["not-an-ip"]
    fleet = inventory.build_fleet(hostvars, list(hostvars))
    with pytest.raises(ValueError, match="host node1: ztmesh_workloads\\[0\\].addresses\\[0\\]"):
        renderer.mesh_state(fleet)
