"""Mesh state: workloads, services and policies in ztunnel's local configuration format.

This is the YAML file ztunnel reads with ``LOCAL_XDS_PATH`` (``LocalConfig`` in ztunnel's xds client):
top-level ``workloads`` (ztunnel ``Workload`` fields, camelCase, plus ``services``: a map of
``namespace/hostname`` to ``{servicePort: targetPort}``), ``services`` (ztunnel ``Service``) and
``policies`` (ztunnel ``Authorization``). As in ztunnel, unknown keys are errors, so a typo is reported
rather than silently ignored. This is the only parser of the file: the proxy and the signing service
(ztproxy.identity.meshstate, which derives from it which identities run on which node) read it alike,
so they can never disagree about the same file. A workload's identity must be a valid SPIFFE ID
(ztproxy.identity.pki.SpiffeId, the one home of SPIFFE IDs). The policies are validated here with the
authorizer's own parser (ztproxy.authz), so one bad policy makes the whole file invalid: ``ztproxy
check`` names it, and a reload carrying it is rejected as a whole (workloads, services and policies
always change together).

ztproxy reloads the file when it changes (MeshStateWatcher); a file that does not parse is rejected
with a logged error and the previous state stays in force. So is an empty file, and a file the renderer
sealed (ztproxy.meshseal) that is no longer whole: cut at an entry boundary it would still parse.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import yaml

from ztproxy import meshseal
from ztproxy.authz import PolicyError, PolicyIndex
from ztproxy.identity.pki import IdentityError, SpiffeId

log = logging.getLogger("ztproxy.state")

# libyaml's parser when PyYAML was built with it: a large mesh state (thousands of policies) loads
# several times faster than with the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

PROTOCOLS = ("TCP", "HBONE")
HEALTH = ("Healthy", "Unhealthy")

# Workload fields of ztunnel's Workload (serde camelCase) that ztproxy accepts. Those it does not act on
# are accepted so one file serves ztunnel and ztproxy; the ones that change routing and that ztproxy does
# not implement produce a warning.
_WORKLOAD_KEYS = {
    "workloadIps", "waypoint", "networkGateway", "protocol", "networkMode", "uid", "name", "namespace",
    "trustDomain", "serviceAccount", "network", "workloadName", "workloadType", "canonicalName",
    "canonicalRevision", "hostname", "node", "nativeTunnel", "applicationTunnel", "authorizationPolicies",
    "status", "clusterId", "locality", "services", "capacity",
}
_UNSUPPORTED_WORKLOAD_KEYS = ("waypoint", "networkGateway", "applicationTunnel")
_SERVICE_KEYS = {
    "name", "namespace", "hostname", "vips", "ports", "endpoints", "subjectAltNames", "waypoint",
    "loadBalancer", "ipFamilies", "canonical",
}
_ENDPOINT_KEYS = {"workloadUid", "port", "status"}
_TOP_KEYS = {"workloads", "services", "policies"}
# ztunnel's default for a workload that names no service account.
DEFAULT_SERVICE_ACCOUNT = "default"


class MeshStateError(Exception):
    """The mesh state file is not valid; the message names the entry and the key."""


@dataclass(frozen=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str
    trust_domain: str
    workload_ips: Tuple[str, ...]
    protocol: str
    node: str
    status: str = "Healthy"
    workload_name: str = ""
    workload_type: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    cluster_id: str = ""
    authorization_policies: Tuple[str, ...] = ()
    # "namespace/hostname" -> {service port: target port}
    services: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    @property
    def spiffe_id(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def identity(self) -> str:
        return str(self.spiffe_id)

    @property
    def uses_hbone(self) -> bool:
        return self.protocol == "HBONE"


@dataclass(frozen=True)
class Endpoint:
    workload_uid: str
    port: Mapping[int, int]
    status: str = "Healthy"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: Tuple[str, ...]
    ports: Mapping[int, int]
    endpoints: Mapping[str, Endpoint]
    subject_alt_names: Tuple[str, ...] = ()
    allow_unhealthy: bool = False

    @property
    def namespaced_hostname(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass
class MeshState:
    workloads: List[Workload] = field(default_factory=list)
    services: List[Service] = field(default_factory=list)
    policies: List[Any] = field(default_factory=list)  # as written in the file (ztunnel Authorization)
    warnings: List[str] = field(default_factory=list)
    # The validated policies, indexed by scope (built by parse_mesh_state; empty for a hand-made state).
    policy_index: PolicyIndex = field(default_factory=lambda: PolicyIndex.build(()))
    _by_ip: Dict[str, Workload] = field(default_factory=dict, repr=False)
    _by_uid: Dict[str, Workload] = field(default_factory=dict, repr=False)
    _by_vip: Dict[str, Service] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for workload in self.workloads:
            self._by_uid[workload.uid] = workload
            for ip in workload.workload_ips:
                # ztunnel prefers an HBONE workload when two claim one address.
                known = self._by_ip.get(ip)
                if known is None or (workload.uses_hbone and not known.uses_hbone):
                    self._by_ip[ip] = workload
        for service in self.services:
            for vip in service.vips:
                self._by_vip[vip] = service

    def workload_by_ip(self, ip: str) -> Optional[Workload]:
        return self._by_ip.get(_normal_ip(ip))

    def workload_by_uid(self, uid: str) -> Optional[Workload]:
        return self._by_uid.get(uid)

    def service_by_vip(self, ip: str) -> Optional[Service]:
        return self._by_vip.get(_normal_ip(ip))

    def local_workload_by_ip(self, ip: str, node: str) -> Optional[Workload]:
        workload = self.workload_by_ip(ip)
        return workload if workload is not None and workload.node == node else None

    def local_workloads(self, node: str) -> List[Workload]:
        return [w for w in self.workloads if w.node == node]

    def service_endpoints(self, service: Service, service_port: int) -> List[Tuple[Workload, int]]:
        """(workload, target port) for every usable endpoint of ``service`` on ``service_port``."""
        result = []
        for uid, endpoint in service.endpoints.items():
            workload = self._by_uid.get(uid)
            if workload is None or not workload.workload_ips:
                continue
            healthy = endpoint.status == "Healthy" and workload.status == "Healthy"
            if not healthy and not service.allow_unhealthy:
                continue
            target = endpoint.port.get(service_port) or service.ports.get(service_port) or service_port
            result.append((workload, target))
        result.sort(key=lambda item: item[0].uid)
        return result


def _normal_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


# ---------------------------------------------------------------------------------------------------
# Parsing


class _Ctx:
    """Where in the document a value is, for error messages."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, value: Any, expected: str) -> MeshStateError:
        return MeshStateError(f"{self.where}: key '{key}': {value!r} is not valid: expected {expected}")


def _mapping(ctx: _Ctx, value: Any, known: set) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise MeshStateError(f"{ctx.where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise MeshStateError(f"{ctx.where}: unknown key(s) {', '.join(unknown)}; known keys: "
                             f"{', '.join(sorted(known))}")
    return value


def _str(ctx: _Ctx, data: Dict[str, Any], key: str, default: Optional[str] = None) -> str:
    value = data.get(key, default)
    if value is None:
        raise MeshStateError(f"{ctx.where}: key '{key}' is required")
    if not isinstance(value, str):
        raise ctx.fail(key, value, "a string")
    return value


def _ip(ctx: _Ctx, key: str, value: Any) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise ctx.fail(key, value, "an IP address") from None


def _port(ctx: _Ctx, key: str, value: Any, allow_zero: bool = False) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ctx.fail(key, value, "a port number 1-65535" + (" (or 0)" if allow_zero else ""))
    return value


def _port_map(ctx: _Ctx, key: str, value: Any) -> Dict[int, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(key, value, "a mapping of service port to target port, e.g. {80: 8080}")
    return {_port(ctx, key, k): _port(ctx, f"{key}.{k}", v, allow_zero=True) for k, v in value.items()}


def _enum(ctx: _Ctx, data: Dict[str, Any], key: str, choices: Tuple[str, ...], default: str) -> str:
    value = data.get(key, default)
    if value not in choices:
        raise ctx.fail(key, value, "one of " + ", ".join(choices))
    return value


def _parse_workload(index: int, data: Any, default_trust_domain: str, warnings: List[str]) -> Workload:
    ctx = _Ctx(f"workloads[{index}]")
    data = _mapping(ctx, data, _WORKLOAD_KEYS)
    name = _str(ctx, data, "name", "")
    if name:
        ctx = _Ctx(f"workloads[{index}] (name {name!r})")
    namespace = _str(ctx, data, "namespace")
    ips_raw = data.get("workloadIps", [])
    if not isinstance(ips_raw, list):
        raise ctx.fail("workloadIps", ips_raw, "a list of IP addresses")
    ips = tuple(_ip(ctx, f"workloadIps[{i}]", ip) for i, ip in enumerate(ips_raw))
    for key in _UNSUPPORTED_WORKLOAD_KEYS:
        if data.get(key):
            warnings.append(f"{ctx.where}: '{key}' is not supported by ztproxy and is ignored")
    services_raw = data.get("services") or {}
    if not isinstance(services_raw, dict):
        raise ctx.fail("services", services_raw,
                       "a mapping of 'namespace/hostname' to {servicePort: targetPort}")
    services = {}
    for host, ports in services_raw.items():
        if not isinstance(host, str) or "/" not in host:
            raise ctx.fail("services", host, "keys of the form 'namespace/hostname'")
        services[host] = _port_map(ctx, f"services.{host}", ports)
    policies = data.get("authorizationPolicies") or []
    if not isinstance(policies, list) or not all(isinstance(p, str) for p in policies):
        raise ctx.fail("authorizationPolicies", policies, "a list of policy names ('namespace/name')")
    uid = _str(ctx, data, "uid", "") or f"{namespace}/{name or (ips[0] if ips else index)}"
    service_account = _str(ctx, data, "serviceAccount", "") or DEFAULT_SERVICE_ACCOUNT
    trust_domain = _str(ctx, data, "trustDomain", "") or default_trust_domain
    try:
        SpiffeId.of(trust_domain, namespace, service_account)
    except IdentityError as exc:
        raise MeshStateError(f"{ctx.where}: its identity (trustDomain, namespace, serviceAccount): {exc}") \
            from None
    return Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        service_account=service_account,
        trust_domain=trust_domain,
        workload_ips=ips,
        protocol=_enum(ctx, data, "protocol", PROTOCOLS, "TCP"),
        node=_str(ctx, data, "node", ""),
        status=_enum(ctx, data, "status", HEALTH, "Healthy"),
        workload_name=_str(ctx, data, "workloadName", ""),
        workload_type=_str(ctx, data, "workloadType", ""),
        canonical_name=_str(ctx, data, "canonicalName", ""),
        canonical_revision=_str(ctx, data, "canonicalRevision", ""),
        cluster_id=_str(ctx, data, "clusterId", ""),
        authorization_policies=tuple(policies),
        services=services,
    )


def _parse_vip(ctx: _Ctx, index: int, value: Any) -> str:
    # ztunnel's NetworkAddress is "network/ip"; the network part may be empty ("/10.0.0.1").
    if not isinstance(value, str):
        raise ctx.fail(f"vips[{index}]", value, "'network/IP' such as '/10.96.0.10'")
    _, _, ip = value.rpartition("/")
    return _ip(ctx, f"vips[{index}]", ip)


def _parse_service(index: int, data: Any, warnings: List[str]) -> Service:
    ctx = _Ctx(f"services[{index}]")
    data = _mapping(ctx, data, _SERVICE_KEYS)
    hostname = _str(ctx, data, "hostname")
    ctx = _Ctx(f"services[{index}] (hostname {hostname!r})")
    vips_raw = data.get("vips") or []
    if not isinstance(vips_raw, list):
        raise ctx.fail("vips", vips_raw, "a list of 'network/IP'")
    endpoints_raw = data.get("endpoints") or {}
    if not isinstance(endpoints_raw, dict):
        raise ctx.fail("endpoints", endpoints_raw, "a mapping of workload uid to endpoint")
    endpoints = {}
    for uid, raw in endpoints_raw.items():
        ectx = _Ctx(f"{ctx.where} endpoints[{uid!r}]")
        raw = _mapping(ectx, raw, _ENDPOINT_KEYS)
        endpoints[str(uid)] = Endpoint(
            workload_uid=_str(ectx, raw, "workloadUid", str(uid)),
            port=_port_map(ectx, "port", raw.get("port")),
            status=_enum(ectx, raw, "status", HEALTH, "Healthy"),
        )
    lb = data.get("loadBalancer") or {}
    if not isinstance(lb, dict):
        raise ctx.fail("loadBalancer", lb, "a mapping (routingPreferences, mode, healthPolicy)")
    if data.get("waypoint"):
        warnings.append(f"{ctx.where}: 'waypoint' is not supported by ztproxy and is ignored")
    sans = data.get("subjectAltNames") or []
    if not isinstance(sans, list):
        raise ctx.fail("subjectAltNames", sans, "a list of strings")
    return Service(
        name=_str(ctx, data, "name", ""),
        namespace=_str(ctx, data, "namespace"),
        hostname=hostname,
        vips=tuple(_parse_vip(ctx, i, v) for i, v in enumerate(vips_raw)),
        ports=_port_map(ctx, "ports", data.get("ports")),
        endpoints=endpoints,
        subject_alt_names=tuple(str(s) for s in sans),
        allow_unhealthy=lb.get("healthPolicy") == "AllowAll",
    )


def parse_mesh_state(data: Any, default_trust_domain: str) -> MeshState:
    """Build MeshState from a parsed YAML document; raises MeshStateError naming the bad entry."""
    if data is None:
        data = {}
    data = _mapping(_Ctx("mesh state"), data, _TOP_KEYS)
    warnings: List[str] = []
    for key in _TOP_KEYS:
        if data.get(key) is not None and not isinstance(data[key], list):
            raise MeshStateError(f"mesh state: key '{key}' must be a list, got {type(data[key]).__name__}")
    workloads = [_parse_workload(i, w, default_trust_domain, warnings)
                 for i, w in enumerate(data.get("workloads") or [])]
    services = [_parse_service(i, s, warnings) for i, s in enumerate(data.get("services") or [])]
    seen: Dict[str, int] = {}
    for i, workload in enumerate(workloads):
        if workload.uid in seen:
            raise MeshStateError(f"workloads[{i}]: uid {workload.uid!r} is also used by "
                                 f"workloads[{seen[workload.uid]}]: uids must be unique")
        seen[workload.uid] = i
    services = _attach_workload_endpoints(services, workloads)
    policies = data.get("policies") or []
    try:
        index = PolicyIndex.from_raw(policies)
    except PolicyError as exc:
        raise MeshStateError(str(exc)) from None
    return MeshState(workloads=workloads, services=services, policies=list(policies), warnings=warnings,
                     policy_index=index)


def _attach_workload_endpoints(services: List[Service], workloads: List[Workload]) -> List[Service]:
    """As ztunnel's local client: a workload's ``services`` map makes it an endpoint of those services."""
    by_host = {s.namespaced_hostname: s for s in services}
    extra: Dict[str, Dict[str, Endpoint]] = {}
    for workload in workloads:
        for host, ports in workload.services.items():
            if host in by_host:
                extra.setdefault(host, {})[workload.uid] = Endpoint(workload.uid, dict(ports),
                                                                    workload.status)
    result = []
    for service in services:
        added = extra.get(service.namespaced_hostname)
        if added:
            endpoints = dict(added)
            endpoints.update(service.endpoints)
            service = Service(service.name, service.namespace, service.hostname, service.vips,
                              service.ports, endpoints, service.subject_alt_names, service.allow_unhealthy)
        result.append(service)
    return result


def load_mesh_state(path: str, default_trust_domain: str) -> MeshState:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise MeshStateError(f"mesh state file {path} does not exist") from None
    except OSError as exc:
        raise MeshStateError(f"cannot read mesh state file {path}: {exc.strerror}") from None
    return parse_mesh_state_bytes(raw, default_trust_domain, f"mesh state file {path}")


def parse_mesh_state_bytes(raw: bytes, default_trust_domain: str, source: str = "mesh state") -> MeshState:
    """A mesh state file's bytes -> MeshState. A sealed file (ztproxy.meshseal, as the renderer writes
    it) must be whole; any file must hold a document: an empty one, as a half-written or truncated copy
    leaves, would drop every workload, so it is refused and the previous state stays in force."""
    try:
        expected = meshseal.verify(raw)
    except meshseal.SealError as exc:
        raise MeshStateError(f"{source}: refused: {exc}") from None
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)
    except UnicodeDecodeError as exc:
        raise MeshStateError(f"{source} is not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise MeshStateError(f"{source} is not valid YAML: {exc}") from None
    if data is None:
        raise MeshStateError(
            f"{source} is empty (no workloads, services or policies keys): refused, a partial write leaves "
            f"such a file; write at least 'workloads: []' for a mesh that really has nothing")
    try:
        meshseal.check_counts(expected, data)
    except meshseal.SealError as exc:
        raise MeshStateError(f"{source}: refused: {exc}") from None
    try:
        return parse_mesh_state(data, default_trust_domain)
    except MeshStateError as exc:
        raise MeshStateError(f"{source}: {exc}") from None


def file_signature(path: str) -> Optional[Tuple[int, int, int, int]]:
    """What identifies one version of a file: an atomic rename changes the inode, an edit the mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class MeshStateWatcher:
    """Holds the current mesh state and replaces it when the file changes and the new one is valid."""

    def __init__(self, path: str, default_trust_domain: str,
                 on_change: Optional[Callable[[MeshState], None]] = None) -> None:
        self.path = path
        self.default_trust_domain = default_trust_domain
        self.on_change = on_change
        self._signature = file_signature(path)
        self.current = load_mesh_state(path, default_trust_domain)
        for warning in self.current.warnings:
            log.warning("mesh state: %s", warning)
        self.generation = 1

    def poll(self) -> bool:
        """Reload when the file changed; returns True when a new state took effect."""
        signature = file_signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        if signature is None:
            log.error("mesh state file %s disappeared; keeping the previous state", self.path)
            return False
        try:
            state = load_mesh_state(self.path, self.default_trust_domain)
        except MeshStateError as exc:
            log.error("rejected the new mesh state, keeping the previous one: %s", exc)
            return False
        for warning in state.warnings:
            log.warning("mesh state: %s", warning)
        self.current = state
        self.generation += 1
        log.info("mesh state reloaded: %d workloads, %d services, %d policies",
                 len(state.workloads), len(state.services), len(state.policies))
        if self.on_change is not None:
            self.on_change(state)
        return True
