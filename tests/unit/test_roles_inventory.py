"""The inventory model (module_utils/ztmesh_inventory.py): every bad inventory is refused
with an error naming the host and the variable, before any host is changed; good ones normalize."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_inventory as inventory

REPO = Path(__file__).resolve().parents[2]




def example_hostvars() -> Dict[str, Dict[str, Any]]:
    """Host variables as Ansible sees them for playbooks/inventory/example.yml (group vars + host vars)."""
    data = yaml.safe_load((REPO / "playbooks/inventory/example.yml").read_text())
    group = data["all"]["children"]["ztmesh_nodes"]
    return {host: {**copy.deepcopy(group["vars"]), **copy.deepcopy(hv)}
            for host, hv in group["hosts"].items()}


def fleet_of(hostvars: Dict[str, Dict[str, Any]]) -> dict:
    return inventory.build_fleet(hostvars, list(hostvars))


def two_nodes(**fleet_vars: Any) -> Dict[str, Dict[str, Any]]:
    base = {
        "n1": {"ztmesh_workloads": [{"name": "web", "addresses": ["10.0.0.1"], "namespace": "shop",
                                     "service_account": "web", "ports": [8080]}]},
        "n2": {"ztmesh_workloads": [{"name": "db", "kind": "contained", "addresses": ["10.244.2.5"],
                                     "namespace": "shop", "service_account": "db", "ports": [5432]}]},
    }
    for host in base.values():
        host.update(copy.deepcopy(fleet_vars))
    return base


def test_example_inventory_is_valid_and_normalized() -> None:
    fleet = fleet_of(example_hostvars())
    assert fleet["errors"] == []
    assert sorted(fleet["nodes"]) == ["node1", "node2", "node3"]
    db = next(w for w in fleet["nodes"]["node3"]["workloads"] if w["name"] == "db")
    assert db == {"name": "db", "kind": "contained", "addresses": ["10.244.3.10"], "namespace": "shop",
                  "service_account": "db", "ports": [5432], "protocol": "HBONE"}
    web = next(s for s in fleet["services"] if s["name"] == "web")
    assert web["hostname"] == "web.shop.svc.cluster.local"
    assert web["vip"] == "10.96.0.10"
    assert web["endpoints"] == [{"host": "node1", "workload": "web"}, {"host": "node2", "workload": "web"}]
    policy = next(p for p in fleet["policies"] if p["name"] == "db-from-web-only")
    assert policy["scope"] == "WorkloadSelector" and policy["action"] == "Allow"
    assert policy["workloads"] == [{"host": "node3", "workload": "db"}]
    assert policy["rules"] == [[[{"service_accounts": [{"namespace": "shop", "serviceAccount": "web"}],
                                  "destination_ports": [5432]}]]]


def test_node_views_feed_the_data_plane_and_enrollment() -> None:
    fleet = fleet_of(example_hostvars())
    assert inventory.node_workload_ips(fleet, "node3") == ["10.20.0.13", "10.244.3.10"]
    assert inventory.node_host_ips(fleet, "node3") == ["10.20.0.13"]
    assert inventory.node_contained_ips(fleet, "node3") == ["10.244.3.10"]
    assert [i["spiffe_id"] for i in inventory.node_identities(fleet, "node3")] == [
        "spiffe://cluster.local/ns/shop/sa/batch", "spiffe://cluster.local/ns/shop/sa/db"]
    enrollments = inventory.node_enrollments(fleet, "node3")
    assert enrollments[-1] == {"node_name": "node3", "label": "node identity of node3"}
    dirs = inventory.identity_dirs(["spiffe://cluster.local/ns/shop/sa/db"], "/c")
    assert dirs == ["/c/shop", "/c/shop/db"]


def test_tcp_workloads_are_known_but_not_captured() -> None:
    hostvars = two_nodes()
    legacy = {"name": "legacy", "addresses": ["10.0.0.9"], "protocol": "TCP"}
    hostvars["n1"]["ztmesh_workloads"].append(legacy)
    fleet = fleet_of(hostvars)
    assert fleet["errors"] == []
    assert inventory.node_workload_ips(fleet, "n1") == ["10.0.0.1"]
    assert [i["service_account"] for i in inventory.node_identities(fleet, "n1")] == ["web"]


def test_policy_shorthands_and_camel_case_keys() -> None:
    policies = [
        # ztunnel's own nesting (list of clauses, list of matches) and camelCase field names.
        {"name": "p1", "namespace": "shop", "action": "deny", "scope": "Global",
         "rules": [[[{"notDestinationPorts": [22], "sourceIps": ["10.9.0.0/16"]}]]]},
        {"name": "p2", "namespace": "shop", "action": "Allow", "dryRun": True,
         "rules": [{"clauses": [{"matches": [{"principals": ["spiffe://cluster.local/ns/shop/sa/*"],
                                              "namespaces": ["*"]}]}]}]},
    ]
    fleet = fleet_of(two_nodes(ztmesh_policies=policies))
    assert fleet["errors"] == []
    p1, p2 = fleet["policies"]
    assert p1["action"] == "Deny" and p1["scope"] == "Global"
    assert p1["rules"] == [[[{"source_ips": ["10.9.0.0/16"], "not_destination_ports": [22]}]]]
    assert p2["dry_run"] is True
    assert p2["rules"] == [[[{"namespaces": [{"Presence": []}],
                              "principals": [{"Prefix": "cluster.local/ns/shop/sa/"}]}]]]


# Each bad inventory: (what to change, text every error must contain). The text names the host (or the
# fleet-wide variable) and the variable path, so the operator knows where to look.
BAD_CASES = [
    ("bad address", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(addresses=["10.0.0.300"]),
     "host n1: ztmesh_workloads[0].addresses[0]: '10.0.0.300' is not an IP address"),
    ("ipv6 address", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(addresses=["fd00::1"]),
     "host n1: ztmesh_workloads[0].addresses[0]: fd00::1 is an IPv6 address"),
    ("no address", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(addresses=[]),
     "host n1: ztmesh_workloads[0].addresses: at least one IPv4 address is required"),
    ("address not a list", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(addresses="10.0.0.1"),
     "host n1: ztmesh_workloads[0].addresses: expected a list of IPv4 addresses"),
    ("unknown key", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(serviceaccount="web"),
     "host n1: ztmesh_workloads[0]: unknown key 'serviceaccount'"),
    ("bad kind", lambda hv: hv["n2"]["ztmesh_workloads"][0].update(kind="pod"),
     "host n2: ztmesh_workloads[0].kind: 'pod' is not valid"),
    ("bad name", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(name="Web_1"),
     "host n1: ztmesh_workloads[0].name: 'Web_1' is not a valid workload name"),
    ("bad port", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(ports=[70000]),
     "host n1: ztmesh_workloads[0].ports[0]: 70000 is not a port"),
    ("bad protocol", lambda hv: hv["n1"]["ztmesh_workloads"][0].update(protocol="mtls"),
     "host n1: ztmesh_workloads[0].protocol: 'mtls' is not valid"),
    ("workloads not a list", lambda hv: hv["n1"].update(ztmesh_workloads={"name": "web"}),
     "host n1: ztmesh_workloads: expected a list of workloads"),
    ("duplicate workload name", lambda hv: hv["n1"]["ztmesh_workloads"].append(
        {"name": "web", "addresses": ["10.0.0.2"]}),
     "host n1: ztmesh_workloads[1].name: 'web' is also the name of ztmesh_workloads[0]"),
    ("address on two nodes", lambda hv: hv["n2"]["ztmesh_workloads"][0].update(addresses=["10.0.0.1"]),
     "host n2: ztmesh_workloads[0].addresses: 10.0.0.1 is also an address of workload web on host n1"),
    ("duplicate node name", lambda hv: hv["n2"].update(ztmesh_node_name="n1"),
     "host n2: ztmesh_node_name: 'n1' is also the node name of host n1"),
    ("fleet variable differs", lambda hv: hv["n2"].update(ztmesh_trust_domain="other.local"),
     "host n2: ztmesh_trust_domain: differs from the value node n1 sees"),
    ("bad trust domain", lambda hv: [h.update(ztmesh_trust_domain="Bad/Domain") for h in hv.values()],
     "ztmesh_trust_domain: 'Bad/Domain' is not a SPIFFE trust domain"),
    ("bad CA address", lambda hv: [h.update(ztmesh_ca_addresses=["10.0.0.5"]) for h in hv.values()],
     "ztmesh_ca_addresses[0]: '10.0.0.5' is not a signing service address"),
    ("revoked node still a member", lambda hv: [h.update(ztmesh_revoked_nodes=["n2"]) for h in hv.values()],
     "host n2: ztmesh_revoked_nodes: node n2 is revoked but still in group ztmesh_nodes"),
    ("service endpoint unknown", lambda hv: _services(hv, [{"name": "web", "namespace": "shop", "ports": [80],
                                                            "endpoints": ["nosuch"]}]),
     "ztmesh_services[0].endpoints[0]: 'nosuch' matches no workload named 'nosuch' in namespace 'shop'"),
    ("service endpoint node unknown", lambda hv: _services(hv, [{"name": "web", "namespace": "shop",
                                                                 "ports": [80], "endpoints": ["n9/web"]}]),
     "ztmesh_services[0].endpoints[0]: 'n9/web': there is no node named 'n9'"),
    ("service endpoint wrong namespace", lambda hv: _services(hv, [{"name": "web", "ports": [80],
                                                                    "endpoints": ["web"]}]),
     "ztmesh_services[0].endpoints[0]: 'web' matches no workload named 'web' in namespace 'default'"),
    ("service target port not served",
     lambda hv: _services(hv, [{"name": "web", "namespace": "shop", "endpoints": ["web"],
                                "ports": [{"port": 80, "target_port": 9090}]}]),
     "ztmesh_services[0].ports: port 80 targets 9090, but workload web on n1 declares ports [8080]"),
    ("service without ports", lambda hv: _services(hv, [{"name": "web", "namespace": "shop", "ports": [],
                                                         "endpoints": ["web"]}]),
     "ztmesh_services[0].ports: a service needs at least one port"),
    ("service VIP is a workload address", lambda hv: _services(hv, [{"name": "web", "namespace": "shop",
                                                                     "vip": "10.0.0.1", "ports": [8080],
                                                                     "endpoints": ["web"]}]),
     "ztmesh_services[0].vip: 10.0.0.1 is also an address of workload web on host n1"),
    ("duplicate service", lambda hv: _services(hv, [{"name": "web", "namespace": "shop", "ports": [8080],
                                                     "endpoints": ["web"]}] * 2),
     "ztmesh_services[1]: service shop/web is defined twice"),
    ("policy bad action", lambda hv: _policies(hv, [{"name": "p", "action": "permit", "rules": []}]),
     "ztmesh_policies[0].action: 'permit' is not valid: expected one of allow, deny"),
    ("policy empty match", lambda hv: _policies(hv, [{"name": "p", "action": "DENY",
                                                      "rules": [{"clauses": [{"matches": [{}]}]}]}]),
     "ztmesh_policies[0].rules[0].clauses[0].matches[0]: an empty match never matches anything"),
    ("policy unknown field", lambda hv: _policies(hv, [{"name": "p", "action": "DENY",
                                                        "rules": [[[{"source_ip": ["10.0.0.0/8"]}]]]}]),
     "ztmesh_policies[0].rules[0].clauses[0].matches[0]: unknown key 'source_ip'"),
    ("policy bad cidr", lambda hv: _policies(hv, [{"name": "p", "action": "DENY",
                                                   "rules": [[[{"source_ips": ["10.0.0.0/33"]}]]]}]),
     "ztmesh_policies[0].rules[0].clauses[0].matches[0].source_ips[0]: '10.0.0.0/33' is not an address"),
    ("policy bad service account", lambda hv: _policies(hv, [{"name": "p", "action": "ALLOW",
                                                              "rules": [[[{"service_accounts": ["web"]}]]]}]),
     "ztmesh_policies[0].rules[0].clauses[0].matches[0].service_accounts[0]: 'web' is not a service account"),
    ("policy workload scope without workloads",
     lambda hv: _policies(hv, [{"name": "p", "action": "ALLOW", "scope": "workload", "rules": []}]),
     "ztmesh_policies[0].workloads: scope workload needs the workloads the policy applies to"),
    ("policy workloads with namespace scope", lambda hv: _policies(hv, [{"name": "p", "action": "ALLOW",
                                                                         "namespace": "shop",
                                                                         "scope": "namespace",
                                                                         "workloads": ["web"]}]),
     "ztmesh_policies[0].workloads: workloads only applies to scope workload"),
    ("policy bad dry_run", lambda hv: _policies(hv, [{"name": "p", "action": "ALLOW", "dry_run": "yes"}]),
     "ztmesh_policies[0].dry_run: 'yes' is not a boolean"),
    ("duplicate policy", lambda hv: _policies(hv, [{"name": "p", "action": "ALLOW"}] * 2),
     "ztmesh_policies[1].name: policy default/p is defined twice"),
]


def _services(hostvars: Dict[str, Dict[str, Any]], services: List[dict]) -> None:
    for host in hostvars.values():
        host["ztmesh_services"] = copy.deepcopy(services)


def _policies(hostvars: Dict[str, Dict[str, Any]], policies: List[dict]) -> None:
    for host in hostvars.values():
        host["ztmesh_policies"] = copy.deepcopy(policies)


@pytest.mark.parametrize("change,expected", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_inventory_is_refused_naming_host_and_variable(change, expected: str) -> None:
    hostvars = two_nodes()
    assert fleet_of(hostvars)["errors"] == []
    change(hostvars)
    errors = fleet_of(hostvars)["errors"]
    assert any(expected in e for e in errors), f"expected an error containing {expected!r}, got {errors}"


def test_errors_are_grouped_by_host_and_fleet() -> None:
    hostvars = two_nodes()
    hostvars["n1"]["ztmesh_workloads"][0]["addresses"] = ["999.1.1.1"]
    _services(hostvars, [{"name": "x", "ports": [80], "endpoints": ["missing"]}])
    fleet = fleet_of(hostvars)
    assert list(fleet["errors_by_host"]) == ["n1"]
    assert all(e.startswith("host n1: ") for e in fleet["errors_by_host"]["n1"])
    assert len(fleet["fleet_errors"]) == 1 and fleet["fleet_errors"][0].startswith("ztmesh_services[0]")


def test_empty_group_is_an_error() -> None:
    fleet = inventory.build_fleet({}, [])
    assert fleet["errors"] and "no hosts in group ztmesh_nodes" in fleet["errors"][0]


# --- the same through Ansible: playbooks/validate.yml stops the run, contacting no host ----------------

def _run_validate(tmp_path: Path, hostvars: Dict[str, Dict[str, Any]]) -> subprocess.CompletedProcess:
    hosts = {h: {**v, "ansible_connection": "local"} for h, v in hostvars.items()}
    inventory_file = tmp_path / "inventory.yml"
    inventory_file.write_text(yaml.safe_dump({"all": {"children": {"ztmesh_nodes": {"hosts": hosts}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory_file),
                           str(REPO / "playbooks/validate.yml")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.timeout(180)
def test_validate_playbook_accepts_the_example_and_refuses_a_bad_inventory(tmp_path: Path) -> None:
    good = _run_validate(tmp_path, two_nodes())
    assert good.returncode == 0, good.stdout + good.stderr
    bad = two_nodes()
    bad["n2"]["ztmesh_workloads"][0]["addresses"] = ["10.0.0.1"]
    proc = _run_validate(tmp_path, bad)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert ("host n2: ztmesh_workloads[0].addresses: 10.0.0.1 is also an address of workload web on host n1"
            in out)
    recap = out[out.index("PLAY RECAP"):]
    assert re.search(r"n2\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=1", recap), recap


@pytest.mark.timeout(180)
def test_validate_playbook_checks_role_variables_of_every_host(tmp_path: Path) -> None:
    """Variables of the roles (here the data plane's) are checked up front too, per host."""
    hostvars = two_nodes()
    hostvars["n2"]["ztmesh_tunnel_kind"] = "gre"
    hostvars["n2"]["ztmesh_exclude_inbound_ports"] = {"ssh": 22}
    proc = _run_validate(tmp_path, hostvars)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("host n2: role ztmesh_node: value of ztmesh_tunnel_kind must be one of: geneve, vxlan, got: gre"
            in out)
    assert "host n2: role ztmesh_node: argument 'ztmesh_exclude_inbound_ports' is of type dict" in out
    assert "fatal: [n1]" not in out and "failed: [n1]" not in out
    # One line per host and variable, not the whole argument spec (8,674 characters per host before).
    assert "argument_spec_data" not in out and "ztmesh_mark_dns" not in out
    assert len(out) < 6000, len(out)
