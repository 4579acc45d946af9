"""Render the mesh state of the whole fleet in ztunnel's local configuration format.

Input: the normalized fleet of ``build_fleet`` (ztmesh_inventory.py). Output: the document ztunnel
loads with ``LOCAL_XDS_PATH`` and ztproxy loads as its mesh state: top-level ``workloads``, ``services``,
``policies``, camelCase fields of ztunnel's Workload, Service and Authorization. Every node receives the
same document; a proxy finds its own workloads by their ``node`` field.

The output is deterministic (sorted), so rendering an unchanged inventory changes no file. The file is
sealed (``mesh_state_file``): ztproxy refuses a copy that is not whole.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any, Dict, List, Mapping

import yaml  # Ansible's own dependency

WORKLOAD_KIND = "networking.istio.io/WorkloadEntry"


def workload_uid(fleet: Mapping[str, Any], node_name: str, workload: Mapping[str, Any]) -> str:
    """ztunnel's uid format, ``cluster//group/kind/namespace/name``, with the name ``<workload>.<node>``."""
    return f"{fleet['cluster_id']}//{WORKLOAD_KIND}/{workload['namespace']}/{workload['name']}.{node_name}"


def _node_names(fleet: Mapping[str, Any]) -> Dict[str, str]:
    return {host: node["name"] for host, node in fleet["nodes"].items()}


def _render_workloads(fleet: Mapping[str, Any]) -> List[dict]:
    names = _node_names(fleet)
    service_ports: Dict[tuple, Dict[str, Dict[int, int]]] = {}
    for service in fleet["services"]:
        key = f"{service['namespace']}/{service['hostname']}"
        for endpoint in service["endpoints"]:
            ports = service_ports.setdefault((endpoint["host"], endpoint["workload"]), {})
            ports[key] = {p["port"]: p["target_port"] for p in service["ports"]}
    selected: Dict[tuple, List[str]] = {}
    for policy in fleet["policies"]:
        for ref in policy["workloads"]:
            selected.setdefault((ref["host"], ref["workload"]), []).append(
                f"{policy['namespace']}/{policy['name']}")
    rendered = []
    for host, node in fleet["nodes"].items():
        for workload in node["workloads"]:
            key = (host, workload["name"])
            item = {
                "uid": workload_uid(fleet, node["name"], workload),
                "name": f"{workload['name']}.{node['name']}",
                "namespace": workload["namespace"],
                "serviceAccount": workload["service_account"],
                "trustDomain": fleet["trust_domain"],
                "workloadIps": list(workload["addresses"]),
                "protocol": workload["protocol"],
                "node": names[host],
                "network": fleet["network"],
                "clusterId": fleet["cluster_id"],
                "workloadName": workload["name"],
                "canonicalName": workload["name"],
                "status": "Healthy",
            }
            if key in service_ports:
                item["services"] = service_ports[key]
            if key in selected:
                item["authorizationPolicies"] = sorted(selected[key])
            rendered.append(item)
    return sorted(rendered, key=lambda w: w["uid"])


def _render_services(fleet: Mapping[str, Any]) -> List[dict]:
    workloads = {(host, w["name"]): w for host, node in fleet["nodes"].items() for w in node["workloads"]}
    rendered = []
    for service in fleet["services"]:
        identities = set()
        for endpoint in service["endpoints"]:
            workload = workloads[(endpoint["host"], endpoint["workload"])]
            if workload["protocol"] == "HBONE":
                identities.add(f"spiffe://{fleet['trust_domain']}/ns/{workload['namespace']}/sa/"
                               f"{workload['service_account']}")
        item = {
            "name": service["name"],
            "namespace": service["namespace"],
            "hostname": service["hostname"],
            # ztunnel's NetworkAddress: "network/ip". A DNS-only service has no VIP: its name resolves to
            # the endpoints' own addresses.
            "vips": [f"{fleet['network']}/{service['vip']}"] if service["vip"] else [],
            "ports": {p["port"]: p["target_port"] for p in service["ports"]},
            "subjectAltNames": sorted(identities),
        }
        rendered.append(item)
    return sorted(rendered, key=lambda s: (s["namespace"], s["hostname"]))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _render_match(match: Mapping[str, list]) -> dict:
    rendered = {}
    for field, values in match.items():
        if field.endswith("_ips"):
            values = sorted(values, key=lambda v: (ipaddress.ip_network(v).version, ipaddress.ip_network(v)))
        rendered[_camel(field)] = list(values)
    return rendered


def _render_policies(fleet: Mapping[str, Any]) -> List[dict]:
    rendered = []
    for policy in fleet["policies"]:
        rendered.append({
            "name": policy["name"],
            "namespace": policy["namespace"],
            "scope": policy["scope"],
            "action": policy["action"],
            "dryRun": policy["dry_run"],
            "rules": [[[_render_match(m) for m in clause] for clause in rule] for rule in policy["rules"]],
        })
    return sorted(rendered, key=lambda p: (p["namespace"], p["name"]))


def mesh_state(fleet: Mapping[str, Any]) -> dict:
    """The mesh state document of ``fleet``; refuses a fleet that failed validation."""
    if fleet.get("errors"):
        raise ValueError("the inventory has errors; run playbooks/validate.yml and fix them first:\n  "
                         + "\n  ".join(fleet["errors"]))
    return {
        "workloads": _render_workloads(fleet),
        "services": _render_services(fleet),
        "policies": _render_policies(fleet),
    }


# The seal (ztproxy/meshseal.py reads it; docs/ztproxy.md "Mesh state integrity"): the first line says
# the file is sealed, the last one holds the entry counts and the SHA-256 of every byte before it. A copy
# cut anywhere, or an empty one, is then refused by ztproxy and the signer, which keep their last good
# state, instead of being loaded as a mesh without workloads. The format is written out here rather than
# imported because this runs on the controller, where ztproxy need not be installed;
# tests/unit/test_mesh_state_seal.py checks that both sides agree.
SEAL_HEADER = "# ztmesh-mesh-state v1"
SEAL_TRAILER = "# ztmesh-mesh-state-end"
_SECTIONS = ("workloads", "services", "policies")


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also writes subclasses of str, int, float, dict and list (Ansible's tagged or
    unsafe values)."""


_Dumper.add_multi_representer(str, yaml.representer.SafeRepresenter.represent_str)
_Dumper.add_multi_representer(int, yaml.representer.SafeRepresenter.represent_int)
_Dumper.add_multi_representer(float, yaml.representer.SafeRepresenter.represent_float)
_Dumper.add_multi_representer(dict, yaml.representer.SafeRepresenter.represent_dict)
_Dumper.add_multi_representer(list, yaml.representer.SafeRepresenter.represent_list)


def mesh_state_file(fleet: Mapping[str, Any]) -> str:
    """The whole mesh state file: sealed header, the document (keys sorted, block style), seal."""
    document = mesh_state(fleet)
    text = yaml.dump(document, Dumper=_Dumper, indent=2, sort_keys=True, default_flow_style=False,
                     allow_unicode=True, width=1000)
    body = (f"{SEAL_HEADER} (roles/ztmesh_state): the workloads, services and policies of the mesh,\n"
            "# rendered from the inventory. ztproxy re-reads this file when it changes and refuses it\n"
            "# unless it ends with its seal line. Do not edit by hand: run playbooks/refresh-state.yml.\n"
            f"{text}")
    counts = " ".join(f"{name}={len(document[name])}" for name in _SECTIONS)
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f"{body}{SEAL_TRAILER} {counts} sha256={digest}\n"
