"""The ztmesh inventory model: read it from every node's variables, check it, normalize it.

``build_fleet(hostvars, hosts)`` returns the whole fleet as plain data (every default filled in, every
reference resolved) plus the errors found, each naming the host, the variable and what is wrong. The
playbooks stop on any error before a host is changed (playbooks/validate.yml); the roles and the mesh
state renderer (ztmesh_mesh_state.py) work from the normalized fleet only, so the inventory is
interpreted in exactly one place. docs/inventory.md is the reference of every variable checked here.

This is the model only; the filters of filter_plugins/ztmesh_inventory.py (the collection's
plugins/filter) are thin wrappers that hand it Ansible's hostvars. It runs on the controller, never on
a node. Pure Python (no Ansible import) so unit tests import it directly.
"""

from __future__ import annotations

import difflib
import glob
import ipaddress
import os
import re
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

# The defaults of the inventory model: the single place they are written down (docs/inventory.md).
INVENTORY_DEFAULTS: Dict[str, Any] = {
    "ztmesh_trust_domain": "cluster.local",
    "ztmesh_cluster_id": "ztmesh",
    "ztmesh_network": "",
    "ztmesh_cluster_domain": "cluster.local",
    "ztmesh_services": [],
    "ztmesh_policies": [],
    "ztmesh_workloads": [],
    "ztmesh_revoked_nodes": [],
    "ztmesh_ca_addresses": [],
}
# Variables every node must see with one value (set them in group_vars, not host_vars).
FLEET_VARIABLES = (
    "ztmesh_trust_domain", "ztmesh_cluster_id", "ztmesh_network", "ztmesh_cluster_domain",
    "ztmesh_services", "ztmesh_policies", "ztmesh_revoked_nodes", "ztmesh_ca_addresses",
)
WORKLOAD_KINDS = ("host", "contained")
PROTOCOLS = ("HBONE", "TCP")
POLICY_ACTIONS = {"allow": "Allow", "deny": "Deny"}
POLICY_SCOPES = {"global": "Global", "namespace": "Namespace", "workload": "WorkloadSelector",
                 "workloadselector": "WorkloadSelector"}
MATCH_FIELDS = ("namespaces", "service_accounts", "principals", "source_ips", "destination_ips",
                "destination_ports")
ALL_MATCH_FIELDS = MATCH_FIELDS + tuple("not_" + f for f in MATCH_FIELDS)

# The namespace of the node identities (spiffe://<td>/ns/ztmesh-system/sa/node-<node>) and of the signing
# service (sa/ztmesh-ca). A workload there would get one of those identities signed for its node: another
# node's identity, or the CA service's. ztproxy's signer refuses it too (ztproxy/identity/signer.py).
RESERVED_NAMESPACE = "ztmesh-system"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


class Problems:
    """Collects errors; each one says where (host, variable path) and what is wrong and expected."""

    def __init__(self) -> None:
        self.fleet: List[str] = []
        self.by_host: Dict[str, List[str]] = {}

    def add(self, host: Optional[str], where: str, message: str) -> None:
        if host is None:
            self.fleet.append(f"{where}: {message}")
        else:
            self.by_host.setdefault(host, []).append(f"host {host}: {where}: {message}")

    def all(self) -> List[str]:
        return self.fleet + [e for host in sorted(self.by_host) for e in self.by_host[host]]


class _Where:
    """A position in the inventory: the host whose variables hold it (None: fleet-wide) and the path."""

    def __init__(self, problems: Problems, host: Optional[str], path: str) -> None:
        self.problems = problems
        self.host = host
        self.path = path

    def at(self, suffix: str) -> _Where:
        sep = "" if suffix.startswith("[") else "."
        return _Where(self.problems, self.host, f"{self.path}{sep}{suffix}")

    def error(self, message: str) -> None:
        self.problems.add(self.host, self.path, message)


# ---------------------------------------------------------------------------------------------------
# Value checkers: each returns the normalized value or None after recording an error.


def _snake(key: Any) -> Any:
    """Accept ztunnel's camelCase spelling of a key as well as the snake_case one."""
    return _CAMEL.sub("_", key).lower() if isinstance(key, str) else key


def _mapping(where: _Where, value: Any, known: Sequence[str], required: Sequence[str] = ()) -> Optional[dict]:
    if not isinstance(value, Mapping):
        where.error(f"expected a mapping with keys {', '.join(known)}, got {type(value).__name__} {value!r}")
        return None
    data = {}
    for key, item in value.items():
        norm = _snake(key)
        if norm not in known:
            where.error(f"unknown key {key!r}; known keys: {', '.join(known)}")
            continue
        data[norm] = item
    for key in required:
        if data.get(key) in (None, ""):
            where.error(f"key '{key}' is required")
    return data


def _list(where: _Where, value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        where.error(f"expected a list of {what}, got {type(value).__name__} {value!r}")
        return []
    return list(value)


def _label(where: _Where, value: Any, what: str) -> Optional[str]:
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        where.error(f"{value!r} is not a valid {what}: expected a DNS label (lowercase letters, digits and "
                    f"'-', at most 63 characters, starting and ending with a letter or digit)")
        return None
    return value


def _namespace(where: _Where, value: Any) -> Optional[str]:
    namespace = _label(where, value, "namespace")
    if namespace == RESERVED_NAMESPACE:
        where.error(f"namespace {RESERVED_NAMESPACE!r} is reserved for the node identities "
                    f"(node-<node name>) and the signing service (ztmesh-ca): a workload or service there "
                    f"could obtain one of them; choose another namespace")
        return None
    return namespace


def _subdomain(where: _Where, value: Any, what: str) -> Optional[str]:
    if not isinstance(value, str) or len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        where.error(f"{value!r} is not a valid {what}: expected a DNS name such as "
                    f"'web.default.svc.cluster.local'")
        return None
    return value


def _ipv4(where: _Where, value: Any) -> Optional[str]:
    try:
        address = ipaddress.ip_address(str(value)) if isinstance(value, (str, int)) else None
    except ValueError:
        address = None
    if address is None:
        where.error(f"{value!r} is not an IP address: expected an IPv4 address such as 10.0.0.11")
        return None
    if address.version != 4:
        where.error(f"{value} is an IPv6 address: ztmesh captures IPv4 only (IPv6 traffic is left "
                    f"untouched); list the workload's IPv4 address")
        return None
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        where.error(f"{value} cannot be a workload or service address (loopback, unspecified or multicast)")
        return None
    return str(address)


def _cidr(where: _Where, value: Any) -> Optional[str]:
    try:
        return str(ipaddress.ip_network(str(value), strict=False)) if isinstance(value, str) else None
    except ValueError:
        pass
    where.error(f"{value!r} is not an address or CIDR: expected e.g. 10.0.0.0/8 or 10.0.0.5")
    return None


def _port(where: _Where, value: Any) -> Optional[int]:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        where.error(f"{value!r} is not a port: expected an integer from 1 to 65535")
        return None
    return value


def _bool(where: _Where, value: Any) -> Optional[bool]:
    if not isinstance(value, bool):
        where.error(f"{value!r} is not a boolean: expected true or false")
        return None
    return value


def _choice(where: _Where, value: Any, choices: Mapping[str, str]) -> Optional[str]:
    key = value.lower().replace("_", "") if isinstance(value, str) else None
    if key not in choices:
        where.error(f"{value!r} is not valid: expected one of {', '.join(sorted(set(choices)))}")
        return None
    return choices[key]


# ---------------------------------------------------------------------------------------------------
# Workloads (per node)

WORKLOAD_KEYS = ("name", "kind", "addresses", "namespace", "service_account", "ports", "protocol")


def _workload(where: _Where, raw: Any) -> Optional[dict]:
    data = _mapping(where, raw, WORKLOAD_KEYS, required=("name", "addresses"))
    if data is None:
        return None
    before = len(where.problems.all())
    name = _label(where.at("name"), data.get("name"), "workload name") if data.get("name") else None
    kind = data.get("kind", "host")
    if kind not in WORKLOAD_KINDS:
        where.at("kind").error(f"{kind!r} is not valid: expected host (processes of the node itself) or "
                               f"contained (a container or namespace with its own address on this node)")
    addresses = [_ipv4(where.at(f"addresses[{i}]"), a)
                 for i, a in enumerate(_list(where.at("addresses"), data.get("addresses"), "IPv4 addresses"))]
    if data.get("addresses") is not None and not addresses:
        where.at("addresses").error("at least one IPv4 address is required")
    namespace = _namespace(where.at("namespace"), data.get("namespace", "default"))
    account = _label(where.at("service_account"), data.get("service_account", "default"), "service account")
    ports = [_port(where.at(f"ports[{i}]"), p)
             for i, p in enumerate(_list(where.at("ports"), data.get("ports"), "ports"))]
    protocol = data.get("protocol", "HBONE")
    if protocol not in PROTOCOLS:
        where.at("protocol").error(f"{protocol!r} is not valid: expected HBONE (enrolled: captured, mutual "
                                   f"TLS) or TCP (known to the mesh but not enrolled: plain TCP to it)")
    if len(where.problems.all()) != before:
        return None
    return {"name": name, "kind": kind, "addresses": addresses, "namespace": namespace,
            "service_account": account, "ports": sorted(set(ports)), "protocol": protocol}


def _node(problems: Problems, host: str, hostvars: Mapping[str, Any]) -> dict:
    where = _Where(problems, host, "ztmesh_node_name")
    name = hostvars.get("ztmesh_node_name", host)
    name = _subdomain(where, name, "node name (ztmesh_node_name, default: the inventory hostname)") or host
    workloads = []
    raw = hostvars.get("ztmesh_workloads", INVENTORY_DEFAULTS["ztmesh_workloads"])
    wl_where = _Where(problems, host, "ztmesh_workloads")
    seen: Dict[str, int] = {}
    for index, item in enumerate(_list(wl_where, raw, "workloads")):
        workload = _workload(wl_where.at(f"[{index}]"), item)
        if workload is None:
            continue
        if workload["name"] in seen:
            wl_where.at(f"[{index}].name").error(
                f"{workload['name']!r} is also the name of ztmesh_workloads[{seen[workload['name']]}]: "
                f"workload names must be unique on a node")
            continue
        seen[workload["name"]] = index
        workloads.append(workload)
    return {"host": host, "name": name, "workloads": workloads}


# ---------------------------------------------------------------------------------------------------
# Services and policies (fleet-wide)

SERVICE_KEYS = ("name", "namespace", "hostname", "vip", "ports", "endpoints")
SERVICE_PORT_KEYS = ("port", "target_port")
POLICY_KEYS = ("name", "namespace", "scope", "action", "dry_run", "workloads", "rules")

WorkloadIndex = Dict[Tuple[str, str], List[Tuple[str, dict]]]  # (namespace, name) -> [(host, workload)]


def _workload_refs(where: _Where, raw: Any, namespace: str, index: WorkloadIndex,
                   node_hosts: Mapping[str, str]) -> List[Tuple[str, dict]]:
    """'web' = every workload named web in ``namespace``; 'node1/web' = only the one on node node1."""
    found: List[Tuple[str, dict]] = []
    for i, ref in enumerate(_list(where, raw, "workload references ('name' or 'node/name')")):
        at = where.at(f"[{i}]")
        if not isinstance(ref, str) or ref.count("/") > 1 or not ref.strip("/"):
            at.error(f"{ref!r} is not a workload reference: expected 'web' (every workload named web in "
                     f"namespace {namespace}) or 'node1/web' (the one on node node1)")
            continue
        node, _, name = ref.rpartition("/")
        matches = index.get((namespace, name), [])
        if node:
            if node not in node_hosts:
                at.error(f"{ref!r}: there is no node named {node!r} in group ztmesh_nodes "
                         f"(known: {', '.join(sorted(node_hosts))})")
                continue
            matches = [m for m in matches if m[0] == node_hosts[node]]
        if not matches:
            at.error(f"{ref!r} matches no workload named {name!r} in namespace {namespace!r} on "
                     f"{'node ' + node if node else 'any node'}")
        for match in matches:
            if match not in found:
                found.append(match)
    return found


def _service_ports(where: _Where, raw: Any) -> List[dict]:
    """[{port: 80, target_port: 8080}], [80, 443] or {80: 8080}."""
    if isinstance(raw, Mapping):
        raw = [{"port": k, "target_port": v} for k, v in raw.items()]
    ports: List[dict] = []
    for i, item in enumerate(_list(where, raw, "ports")):
        at = where.at(f"[{i}]")
        if not isinstance(item, Mapping):
            item = {"port": item}
        data = _mapping(at, item, SERVICE_PORT_KEYS, required=("port",))
        if data is None or data.get("port") is None:
            continue
        port = _port(at.at("port"), data["port"])
        target = _port(at.at("target_port"), data.get("target_port", data["port"]))
        if port is None or target is None:
            continue
        if any(p["port"] == port for p in ports):
            at.at("port").error(f"port {port} is listed twice")
            continue
        ports.append({"port": port, "target_port": target})
    if not ports:
        where.error("a service needs at least one port, e.g. [{port: 80, target_port: 8080}]")
    return ports


def _service(where: _Where, raw: Any, cluster_domain: str, index: WorkloadIndex,
             node_hosts: Mapping[str, str]) -> Optional[dict]:
    data = _mapping(where, raw, SERVICE_KEYS, required=("name", "ports"))
    if data is None:
        return None
    before = len(where.problems.all())
    name = _label(where.at("name"), data.get("name"), "service name") if data.get("name") else None
    namespace = _namespace(where.at("namespace"), data.get("namespace", "default")) or "default"
    hostname = data.get("hostname") or f"{name}.{namespace}.svc.{cluster_domain}"
    hostname = _subdomain(where.at("hostname"), hostname, "service hostname")
    vip = _ipv4(where.at("vip"), data["vip"]) if data.get("vip") not in (None, "") else None
    ports = _service_ports(where.at("ports"), data.get("ports"))
    endpoints = _workload_refs(where.at("endpoints"), data.get("endpoints"), namespace, index, node_hosts)
    for host, workload in endpoints:
        declared = workload["ports"]
        for port in ports:
            if declared and port["target_port"] not in declared:
                where.at("ports").error(
                    f"port {port['port']} targets {port['target_port']}, but workload {workload['name']} on "
                    f"{host} declares ports {declared}: add the port to the workload or fix target_port")
    if len(where.problems.all()) != before:
        return None
    return {"name": name, "namespace": namespace, "hostname": hostname, "vip": vip, "ports": ports,
            "endpoints": [{"host": h, "workload": w["name"]} for h, w in endpoints]}


def _string_match(where: _Where, value: Any) -> Optional[dict]:
    """Istio's string match: 'x' exact, 'x*' prefix, '*x' suffix, '*' present."""
    if not isinstance(value, str) or not value:
        where.error(f"{value!r} is not valid: expected a string ('x' exact, 'x*' prefix, '*x' suffix, "
                    f"'*' any)")
        return None
    if value == "*":
        return {"Presence": []}
    if value.endswith("*"):
        return {"Prefix": value[:-1]}
    if value.startswith("*"):
        return {"Suffix": value[1:]}
    return {"Exact": value}


def _principal(where: _Where, value: Any) -> Optional[dict]:
    # ztunnel matches principals without the spiffe:// scheme (Istio's convention).
    if isinstance(value, str) and value.startswith("spiffe://"):
        value = value[len("spiffe://"):]
    return _string_match(where, value)


def _service_account(where: _Where, value: Any) -> Optional[dict]:
    if isinstance(value, Mapping):
        keys = ("namespace", "service_account")
        data = _mapping(where, value, keys, required=keys)
        if data is None:
            return None
        namespace, account = data.get("namespace"), data.get("service_account")
    elif isinstance(value, str) and value.count("/") == 1:
        namespace, account = value.split("/")
    else:
        where.error(f"{value!r} is not a service account: expected 'namespace/service-account' or "
                    f"{{namespace: ..., service_account: ...}}")
        return None
    namespace = _label(where, namespace, "namespace")
    account = _label(where, account, "service account")
    return {"namespace": namespace, "serviceAccount": account} if namespace and account else None


_FIELD_CHECKERS: Dict[str, Callable[[_Where, Any], Any]] = {
    "namespaces": _string_match,
    "service_accounts": _service_account,
    "principals": _principal,
    "source_ips": _cidr,
    "destination_ips": _cidr,
    "destination_ports": _port,
}


def _match(where: _Where, raw: Any) -> Optional[dict]:
    data = _mapping(where, raw, ALL_MATCH_FIELDS)
    if data is None:
        return None
    if not any(data.get(f) for f in ALL_MATCH_FIELDS):
        where.error("an empty match never matches anything (ztunnel skips it); give at least one field, or "
                    "remove the clause to match every connection")
        return None
    match: Dict[str, list] = {}
    for name in ALL_MATCH_FIELDS:
        if name not in data:
            continue
        check = _FIELD_CHECKERS[name[4:] if name.startswith("not_") else name]
        items = [check(where.at(f"{name}[{i}]"), v)
                 for i, v in enumerate(_list(where.at(name), data[name], "values"))]
        if any(v is None for v in items):
            return None
        if items:
            match[name] = items
    return match


def _nested(where: _Where, raw: Any, key: str, what: str) -> list:
    """A rule is {clauses: [...]} or a list of clauses; a clause is {matches: [...]} or a list of matches."""
    if isinstance(raw, Mapping):
        data = _mapping(where, raw, (key,), required=(key,))
        return _list(where.at(key), data.get(key) if data else None, what)
    return _list(where, raw, what)


def _policy(where: _Where, raw: Any, index: WorkloadIndex, node_hosts: Mapping[str, str]) -> Optional[dict]:
    data = _mapping(where, raw, POLICY_KEYS, required=("name", "action"))
    if data is None:
        return None
    before = len(where.problems.all())
    name = _label(where.at("name"), data.get("name"), "policy name") if data.get("name") else None
    namespace = _label(where.at("namespace"), data.get("namespace", "default"), "namespace") or "default"
    action = _choice(where.at("action"), data.get("action"), POLICY_ACTIONS) if data.get("action") else None
    default_scope = "workload" if data.get("workloads") else "namespace"
    scope = _choice(where.at("scope"), data.get("scope", default_scope), POLICY_SCOPES)
    dry_run = _bool(where.at("dry_run"), data.get("dry_run", False))
    selected: List[Tuple[str, dict]] = []
    if scope == "WorkloadSelector":
        if not data.get("workloads"):
            where.at("workloads").error("scope workload needs the workloads the policy applies to, "
                                        "e.g. [db] or [node1/db]")
        selected = _workload_refs(where.at("workloads"), data.get("workloads"), namespace, index, node_hosts)
    elif data.get("workloads"):
        where.at("workloads").error(f"workloads only applies to scope workload; this policy's scope is "
                                    f"{scope}")
    rules = []
    for r, rule in enumerate(_nested(where.at("rules"), data.get("rules"), "clauses", "rules")):
        rule_where = where.at(f"rules[{r}]")
        clauses = []
        for c, clause in enumerate(_nested(rule_where, rule, "clauses", "clauses")):
            clause_where = rule_where.at(f"clauses[{c}]")
            matches = [_match(clause_where.at(f"matches[{m}]"), item)
                       for m, item in enumerate(_nested(clause_where, clause, "matches", "matches"))]
            clauses.append([m for m in matches if m is not None])
        rules.append(clauses)
    if len(where.problems.all()) != before:
        return None
    return {"name": name, "namespace": namespace, "scope": scope, "action": action, "dry_run": dry_run,
            "workloads": [{"host": h, "workload": w["name"]} for h, w in selected], "rules": rules}


# ---------------------------------------------------------------------------------------------------
# Variable names: a misspelled ztmesh_*/ztproxy_* variable is an error, never silently ignored



def _content_root() -> str:
    """The directory that holds roles/ and playbooks/: the collection's root (this file is
    plugins/module_utils/ztmesh_inventory.py there) or the repository's (module_utils/ztmesh_inventory.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if all(os.path.isdir(os.path.join(candidate, part)) for part in ("roles", "playbooks")):
            return candidate
    raise RuntimeError(f"ztmesh: no roles/ and playbooks/ above {here}: the collection is incomplete")


CONTENT_ROOT = _content_root()
PLAYBOOKS_DIR = os.path.join(CONTENT_ROOT, "playbooks")
ROLES_DIR = os.path.join(CONTENT_ROOT, "roles")
VARIABLE_PREFIXES = ("ztmesh_", "ztproxy_")
_VARIABLE_TOKEN = re.compile(r"\b(?:ztmesh|ztproxy)_[A-Za-z0-9_]+")
_known_cache: Dict[str, FrozenSet[str]] = {}


def known_variables() -> FrozenSet[str]:
    """Every ztmesh_*/ztproxy_* name an inventory may set, read from the code so it cannot drift: the
    inventory model's own (INVENTORY_DEFAULTS), each role's defaults/main.yml, vars/main.yml and the
    options of every entry point of meta/argument_specs.yml, and the names the playbooks read (the
    rollout controls given as extra vars, e.g. ztmesh_serial, and the facts they set)."""
    if "all" in _known_cache:
        return _known_cache["all"]
    import yaml  # Ansible's own dependency; imported here so the model itself needs only the stdlib.

    names = set(INVENTORY_DEFAULTS) | {"ztmesh_node_name"}
    for role_dir in sorted(glob.glob(os.path.join(ROLES_DIR, "*"))):
        for part in ("defaults", "vars"):
            path = os.path.join(role_dir, part, "main.yml")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    names.update((yaml.safe_load(handle) or {}).keys())
        path = os.path.join(role_dir, "meta", "argument_specs.yml")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                specs = (yaml.safe_load(handle) or {}).get("argument_specs") or {}
            for entry in specs.values():
                names.update((entry or {}).get("options") or {})
    _known_cache["roles"] = frozenset(n for n in names if isinstance(n, str))
    for path in glob.glob(os.path.join(PLAYBOOKS_DIR, "*.yml")) + glob.glob(
            os.path.join(PLAYBOOKS_DIR, "tasks", "*.yml")):
        with open(path, encoding="utf-8") as handle:
            names.update(_VARIABLE_TOKEN.findall(handle.read()))
    _known_cache["all"] = frozenset(n for n in names
                                    if isinstance(n, str) and n.startswith(VARIABLE_PREFIXES))
    return _known_cache["all"]


# Names the roles used for a value they share before it had one name (roles/ztmesh_common): an inventory
# that still sets one is told the name to use, rather than have one role follow it and another not.
RENAMED_VARIABLES: Dict[str, str] = {
    "ztproxy_netns": "ztmesh_proxy_netns",
    "ztproxy_user": "ztmesh_proxy_user", "ztmesh_workloads_owner": "ztmesh_proxy_user",
    "ztproxy_group": "ztmesh_proxy_group", "ztmesh_workloads_group": "ztmesh_proxy_group",
    "ztmesh_state_group": "ztmesh_proxy_group", "ztmesh_ca_server_reader_group": "ztmesh_proxy_group",
    "ztproxy_unit": "ztmesh_proxy_unit", "ztmesh_proxy_service": "ztmesh_proxy_unit",
    "ztproxy_dataplane_unit": "ztmesh_dataplane_unit", "ztmesh_dataplane_unit_name": "ztmesh_dataplane_unit",
    "ztmesh_state_file": "ztmesh_mesh_state_path", "ztproxy_mesh_state_file": "ztmesh_mesh_state_path",
    "ztmesh_ca_server_mesh_state": "ztmesh_mesh_state_path",
    "ztmesh_state_deny_list_file": "ztmesh_deny_list_path", "ztproxy_deny_list_file": "ztmesh_deny_list_path",
    "ztmesh_ca_server_deny_list": "ztmesh_deny_list_path",
    "ztproxy_certs_dir": "ztmesh_certs_dir", "ztmesh_workloads_certs_dir": "ztmesh_certs_dir",
    "ztproxy_trust_bundle": "ztmesh_trust_bundle", "ztmesh_workloads_trust_bundle": "ztmesh_trust_bundle",
    "ztproxy_venv": "ztmesh_runtime_dir", "ztmesh_ca_server_runtime": "ztmesh_runtime_dir",
}


def _unknown_message(name: str, known: FrozenSet[str]) -> str:
    if name in RENAMED_VARIABLES:
        return (f"unknown variable: it is now {RENAMED_VARIABLES[name]}, one variable every role reads "
                f"(roles/ztmesh_common); rename it")
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "no known variable is close to it"
    return (f"unknown variable: {hint} (a misspelled variable is ignored and its setting lost; the "
            f"known ones are in docs/inventory.md and roles/*/defaults/main.yml)")


def _check_variable_names(problems: Problems, hosts: Sequence[str],
                          variable_names: Mapping[str, Sequence[str]]) -> None:
    known = known_variables()
    unknown_on: Dict[str, List[str]] = {}
    for host in hosts:
        for name in variable_names.get(host, ()):
            if isinstance(name, str) and name.startswith(VARIABLE_PREFIXES) and name not in known:
                unknown_on.setdefault(name, []).append(host)
    for name in sorted(unknown_on):
        on = unknown_on[name]
        if len(on) == len(hosts) and len(hosts) > 1:  # group_vars: one error for the whole mesh
            problems.add(None, f"{name} (every node)", _unknown_message(name, known))
        else:
            for host in on:
                problems.add(host, name, _unknown_message(name, known))


# ---------------------------------------------------------------------------------------------------
# Address and CIDR variables of the roles: checked here, before any host is changed, rather than on the
# node by an iptables or ip command whose message names a rule instead of the variable.

ROLE_ADDRESS_SUFFIXES = ("_address", "_addresses", "_cidrs")
MODEL_ADDRESS_VARIABLES = ("ztmesh_ca_addresses",)  # 'host:port' list, checked by build_fleet


def address_variables() -> Tuple[str, ...]:
    """The roles' variables that hold addresses or CIDRs, found by the naming convention the roles
    follow (…_address: one IPv4 address, with a prefix length when it configures an interface;
    …_addresses: a list of them; …_cidrs: a list of networks)."""
    known_variables()
    return tuple(sorted(n for n in _known_cache["roles"]
                        if n.endswith(ROLE_ADDRESS_SUFFIXES) and n not in MODEL_ADDRESS_VARIABLES))


def _interface_address(where: _Where, value: Any) -> None:
    try:
        if not isinstance(value, str):
            raise ValueError
        address = ipaddress.ip_interface(value)
    except ValueError:
        where.error(f"{value!r} is not an IPv4 address (with an optional prefix length, e.g. "
                    f"192.168.125.1/30 or 10.20.0.5)")
        return
    if address.version != 4:
        where.error(f"{value} is an IPv6 address: ztmesh's data plane is IPv4; use an IPv4 address")


def _network(where: _Where, warnings: List[str], host: str, value: Any) -> None:
    try:
        if not isinstance(value, str):
            raise ValueError
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        where.error(f"{value!r} is not an IPv4 network: expected an address or CIDR such as 10.0.0.0/8 "
                    f"or 10.20.0.5 (prefix length 0-32)")
        return
    if network.version != 4:
        where.error(f"{value} is an IPv6 network: ztmesh captures IPv4 only, IPv6 is never captured")
        return
    if "/" in value and str(network) != value:
        warnings.append(f"host {host}: {where.path}: {value} has host bits set; it is used as {network} "
                        f"(write {network} to say so)")


def _check_address_variables(problems: Problems, warnings: List[str], host: str,
                             hostvars: Mapping[str, Any]) -> None:
    for name in address_variables():
        if name not in hostvars:
            continue
        value = hostvars[name]
        where = _Where(problems, host, name)
        if name.endswith("_address"):
            if value not in (None, ""):
                _interface_address(where, value)
            continue
        items = _list(where, value, "addresses" if name.endswith("_addresses") else "CIDRs")
        for i, item in enumerate(items):
            if name.endswith("_cidrs"):
                _network(where.at(f"[{i}]"), warnings, host, item)
            else:
                _interface_address(where.at(f"[{i}]"), item)


# ---------------------------------------------------------------------------------------------------
# The fleet


def _fleet_value(problems: Problems, hosts: Sequence[str], hostvars: Mapping[str, Mapping[str, Any]],
                 name: str) -> Any:
    """A fleet-wide variable: every node must see the same value."""
    default = INVENTORY_DEFAULTS[name]
    values = [(h, hostvars[h].get(name, default)) for h in hosts]
    first_host, first = values[0]
    for host, value in values[1:]:
        if value != first:
            problems.add(host, name, f"differs from the value node {first_host} sees: {name} describes the "
                                     f"whole mesh, set it once in group_vars (ztmesh_nodes or all)")
    return first


def _check_uniqueness(problems: Problems, nodes: List[dict], services: List[dict]) -> None:
    names: Dict[str, str] = {}
    owners: Dict[str, str] = {}
    for node in nodes:
        host = node["host"]
        if node["name"] in names:
            problems.add(host, "ztmesh_node_name", f"{node['name']!r} is also the node name of host "
                                                   f"{names[node['name']]}: node names must be unique")
        names.setdefault(node["name"], host)
        for i, workload in enumerate(node["workloads"]):
            for address in workload["addresses"]:
                owner = f"workload {workload['name']} on host {host}"
                if address in owners and owners[address] != owner:
                    problems.add(host, f"ztmesh_workloads[{i}].addresses",
                                 f"{address} is also an address of {owners[address]}: an address belongs "
                                 f"to one workload")
                owners.setdefault(address, owner)
    seen_services: Dict[Tuple[str, str], int] = {}
    hostnames: Dict[str, int] = {}
    for i, service in enumerate(services):
        key = (service["namespace"], service["name"])
        if key in seen_services:
            problems.add(None, f"ztmesh_services[{i}]", f"service {key[0]}/{key[1]} is defined twice "
                                                        f"(also ztmesh_services[{seen_services[key]}])")
        seen_services.setdefault(key, i)
        if service["hostname"] in hostnames:
            problems.add(None, f"ztmesh_services[{i}].hostname",
                         f"{service['hostname']} is also the hostname of "
                         f"ztmesh_services[{hostnames[service['hostname']]}]")
        hostnames.setdefault(service["hostname"], i)
        if service["vip"]:
            if service["vip"] in owners:
                problems.add(None, f"ztmesh_services[{i}].vip",
                             f"{service['vip']} is also an address of {owners[service['vip']]}: a VIP "
                             f"must be an address no workload or other service uses")
            owners.setdefault(service["vip"], f"service {service['name']}")


def build_fleet(hostvars: Mapping[str, Mapping[str, Any]], hosts: Sequence[str],
                variable_names: Optional[Mapping[str, Sequence[str]]] = None) -> dict:
    """Normalize and check the whole fleet; returns {..., 'errors': [...], 'errors_by_host': {...},
    'warnings': [...]}. ``variable_names``: every variable name each host has (default: the keys of its
    ``hostvars``), to find misspelled ztmesh_*/ztproxy_* variables."""
    problems = Problems()
    hosts = list(hosts or [])
    if not hosts:
        problems.add(None, "groups['ztmesh_nodes']", "the inventory has no hosts in group ztmesh_nodes: put "
                                                     "every mesh node in that group (docs/inventory.md)")
        return {"errors": problems.all(), "errors_by_host": {}, "fleet_errors": problems.fleet, "nodes": {},
                "services": [], "policies": [], "warnings": []}
    if variable_names is None:
        variable_names = {host: list(hostvars[host]) for host in hosts}
    _check_variable_names(problems, hosts, variable_names)
    warnings: List[str] = []
    for host in hosts:
        _check_address_variables(problems, warnings, host, hostvars[host])
    fleet_vars = {name: _fleet_value(problems, hosts, hostvars, name) for name in FLEET_VARIABLES}
    where = _Where(problems, None, "ztmesh_trust_domain")
    trust_domain = fleet_vars["ztmesh_trust_domain"]
    if not isinstance(trust_domain, str) or not _DNS_SUBDOMAIN.match(trust_domain):
        where.error(f"{trust_domain!r} is not a SPIFFE trust domain: expected e.g. cluster.local")
    cluster_id = fleet_vars["ztmesh_cluster_id"]
    _label(_Where(problems, None, "ztmesh_cluster_id"), cluster_id, "cluster id")
    network = fleet_vars["ztmesh_network"]
    if not isinstance(network, str) or "/" in network:
        problems.add(None, "ztmesh_network", f"{network!r} is not valid: expected a network name without '/' "
                                             f"('' when the whole mesh is one network)")
    cluster_domain = _subdomain(_Where(problems, None, "ztmesh_cluster_domain"),
                                fleet_vars["ztmesh_cluster_domain"], "cluster domain") or "invalid"
    revoked = [str(n) for n in _list(_Where(problems, None, "ztmesh_revoked_nodes"),
                                     fleet_vars["ztmesh_revoked_nodes"], "node names")]

    ca_addresses = []
    ca_where = _Where(problems, None, "ztmesh_ca_addresses")
    for i, address in enumerate(_list(ca_where, fleet_vars["ztmesh_ca_addresses"], "'host:port' addresses")):
        host_part, sep, port = str(address).rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host_part:
            ca_where.at(f"[{i}]").error(f"{address!r} is not a signing service address: expected "
                                        f"'host:port', e.g. 10.20.0.5:15012")
            continue
        ca_addresses.append(str(address))

    nodes = [_node(problems, host, hostvars[host]) for host in hosts]
    node_hosts = {node["name"]: node["host"] for node in nodes}
    for name in revoked:
        if name in node_hosts:
            problems.add(node_hosts[name], "ztmesh_revoked_nodes",
                         f"node {name} is revoked but still in group ztmesh_nodes: remove it from the group "
                         f"(or from ztmesh_revoked_nodes to enroll it again)")
    index: WorkloadIndex = {}
    for node in nodes:
        for workload in node["workloads"]:
            index.setdefault((workload["namespace"], workload["name"]), []).append((node["host"], workload))

    services = []
    svc_where = _Where(problems, None, "ztmesh_services")
    for i, raw in enumerate(_list(svc_where, fleet_vars["ztmesh_services"], "services")):
        service = _service(svc_where.at(f"[{i}]"), raw, cluster_domain, index, node_hosts)
        if service is not None:
            services.append(service)
    policies = []
    pol_where = _Where(problems, None, "ztmesh_policies")
    seen_policies: Dict[Tuple[str, str], int] = {}
    for i, raw in enumerate(_list(pol_where, fleet_vars["ztmesh_policies"], "policies")):
        policy = _policy(pol_where.at(f"[{i}]"), raw, index, node_hosts)
        if policy is None:
            continue
        key = (policy["namespace"], policy["name"])
        if key in seen_policies:
            pol_where.at(f"[{i}].name").error(f"policy {key[0]}/{key[1]} is defined twice (also "
                                              f"ztmesh_policies[{seen_policies[key]}])")
            continue
        seen_policies[key] = i
        policies.append(policy)
    _check_uniqueness(problems, nodes, services)
    return {
        "trust_domain": trust_domain,
        "cluster_id": cluster_id,
        "network": network,
        "cluster_domain": cluster_domain,
        "revoked_nodes": revoked,
        "ca_addresses": ca_addresses,
        "nodes": {node["host"]: node for node in nodes},
        "services": services,
        "policies": policies,
        "errors": problems.all(),
        "warnings": warnings,
        "fleet_errors": list(problems.fleet),
        "errors_by_host": {h: list(e) for h, e in problems.by_host.items()},
    }


# ---------------------------------------------------------------------------------------------------
# Per-node views the roles consume


def node_workload_ips(fleet: Mapping[str, Any], host: str) -> List[str]:
    """The addresses of the enrolled (HBONE) workloads of one node: the members of its ipset."""
    node = fleet["nodes"][host]
    return sorted({a for w in node["workloads"] if w["protocol"] == "HBONE" for a in w["addresses"]},
                  key=ipaddress.ip_address)


def node_contained_ips(fleet: Mapping[str, Any], host: str) -> List[str]:
    """Addresses of the node's enrolled contained workloads: each gets an inbound capture route."""
    node = fleet["nodes"][host]
    return sorted({a for w in node["workloads"]
                   if w["protocol"] == "HBONE" and w["kind"] == "contained" for a in w["addresses"]},
                  key=ipaddress.ip_address)


def node_host_ips(fleet: Mapping[str, Any], host: str) -> List[str]:
    node = fleet["nodes"][host]
    return sorted({a for w in node["workloads"]
                   if w["protocol"] == "HBONE" and w["kind"] == "host" for a in w["addresses"]},
                  key=ipaddress.ip_address)


def node_identities(fleet: Mapping[str, Any], host: str) -> List[dict]:
    """The distinct identities (namespace, service account) of one node's enrolled workloads."""
    node = fleet["nodes"][host]
    pairs = sorted({(w["namespace"], w["service_account"])
                    for w in node["workloads"] if w["protocol"] == "HBONE"})
    return [{"namespace": ns, "service_account": sa,
             "spiffe_id": f"spiffe://{fleet['trust_domain']}/ns/{ns}/sa/{sa}"} for ns, sa in pairs]


def node_enrollments(fleet: Mapping[str, Any], host: str, node_identity: bool = True) -> List[dict]:
    """What roles/ztmesh_workloads enrolls on one node: its workload identities, then its node identity."""
    items: List[dict] = [{"namespace": i["namespace"], "service_account": i["service_account"],
                          "label": i["spiffe_id"]} for i in node_identities(fleet, host)]
    if node_identity:
        name = fleet["nodes"][host]["name"]
        items.append({"node_name": name, "label": f"node identity of {name}"})
    return items


def sign_requests(csr_results: Sequence[Mapping[str, Any]]) -> List[dict]:
    """The registered results of ztmesh_cert state=csr -> ztmesh_ca's sign list (only real CSRs)."""
    return [{"identity": r["identity"], "csr": r["csr"]} for r in csr_results if r.get("csr")]


def signed_chain(signed: Mapping[str, Any], identity: str) -> Optional[str]:
    """The certificate chain ztmesh_ca signed for ``identity`` in this run, or None."""
    for cert in (signed or {}).get("certificates", []):
        if cert.get("identity") == identity:
            return cert.get("cert_chain")
    return None


def identity_dirs(identities: Sequence[str], certs_dir: str) -> List[str]:
    """SPIFFE IDs -> their directories <certs_dir>/<namespace>/<service-account> and the namespace dirs."""
    dirs: List[str] = []
    for identity in identities:
        match = re.match(r"^spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)$", identity or "")
        if not match:
            raise ValueError(f"{identity!r} is not a SPIFFE ID of the form spiffe://<td>/ns/<ns>/sa/<sa>")
        for path in (f"{certs_dir}/{match.group(1)}", f"{certs_dir}/{match.group(1)}/{match.group(2)}"):
            if path not in dirs:
                dirs.append(path)
    return dirs


def role_options(role: str, exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """The options of a role's main entry point (roles/<role>/meta/argument_specs.yml), for checking an
    inventory against every role before any host is changed (playbooks/validate.yml)."""
    import yaml  # Ansible's own dependency; imported here so the model itself needs only the stdlib.

    with open(os.path.join(ROLES_DIR, role, "meta", "argument_specs.yml"), encoding="utf-8") as handle:
        options = yaml.safe_load(handle)["argument_specs"]["main"]["options"]
    return {name: spec for name, spec in options.items() if name not in exclude}
