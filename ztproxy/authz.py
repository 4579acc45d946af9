"""L4 authorization with ztunnel's semantics, over the policies of ztunnel's local-config format.

A policy (ztunnel's ``Authorization``) is written in the mesh state as::

    policies:
    - name: allow-web
      namespace: shop
      scope: Namespace            # Global | Namespace | WorkloadSelector
      action: Allow               # Allow | Deny
      dryRun: false
      rules:                      # rules OR; a rule is a list of clauses that AND;
      - - - namespaces: [{Exact: shop}]     # a clause is a list of matches that OR
            destinationPorts: [8080]

Field names, nesting and matching follow ztunnel's ``src/rbac.rs`` exactly:

* inside one match the fields AND, the values of one field OR, a ``not*`` field matches when none of
  its values does, and a match with no field set is skipped (it never matches);
* a clause with no match matches; a rule with no clause matches; a policy with no rule never matches;
* the source identity is the peer's verified SPIFFE ID; plaintext connections have none, and ztunnel
  then compares identity fields with the empty string: ``namespaces``/``principals``/
  ``serviceAccounts`` fail, and their ``not*`` forms *succeed* (nothing excluded is present);
* principals are compared without the ``spiffe://`` prefix (``cluster.local/ns/a/sa/b``).

Which policies apply to a connection is decided by its destination workload, as ztunnel's
``assert_rbac`` does: every ``Global`` policy, every ``Namespace`` policy of the workload's namespace,
and the ``WorkloadSelector`` policies the workload lists in ``authorizationPolicies`` (keys
``namespace/name``). The order is ztunnel's: a matching DENY denies; no ALLOW policy allows; a matching
ALLOW allows; otherwise deny. Dry-run policies (ztunnel PR #1659/#1745) are evaluated and logged to the
``ztproxy.authz`` logger but never change the decision.

Policies are indexed by scope when loaded (global list, per-namespace lists, by key), so a connection
evaluates only the policies of its destination: cost follows the policies that apply, not the size
of the mesh.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ztproxy.hooks import ConnContext, Decision

log = logging.getLogger("ztproxy.authz")

IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IpNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

SCOPES = ("Global", "Namespace", "WorkloadSelector")
ACTIONS = ("Allow", "Deny")
STRING_MATCH_KINDS = ("Exact", "Prefix", "Suffix", "Presence")

# camelCase keys of ztunnel's RbacMatch, each with the parser of its values.
_IDENTITY_STRING_FIELDS = ("namespaces", "notNamespaces", "principals", "notPrincipals")
_SERVICE_ACCOUNT_FIELDS = ("serviceAccounts", "notServiceAccounts")
_NETWORK_FIELDS = ("sourceIps", "notSourceIps", "destinationIps", "notDestinationIps")
_PORT_FIELDS = ("destinationPorts", "notDestinationPorts")
MATCH_FIELDS = _IDENTITY_STRING_FIELDS + _SERVICE_ACCOUNT_FIELDS + _NETWORK_FIELDS + _PORT_FIELDS
POLICY_FIELDS = ("name", "namespace", "scope", "action", "rules", "dryRun")


class PolicyError(ValueError):
    """A policy in the mesh state is malformed; the message names the policy, the field and the fix."""


# --------------------------------------------------------------------------------------------------
# Identities


@dataclass(frozen=True)
class SpiffeId:
    """``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``, the identity form ztunnel knows."""

    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> Optional[SpiffeId]:
        """The parts of ``uri``, or None when it is not of the ``/ns/<ns>/sa/<sa>`` form."""
        if not uri.startswith("spiffe://"):
            return None
        parts = uri[len("spiffe://") :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts[i] for i in (0, 2, 4)):
            return None
        return cls(parts[0], parts[2], parts[4])

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def _normalize_ip(value: Union[str, IpAddress]) -> IpAddress:
    """An address object; IPv4-mapped IPv6 (``::ffff:a.b.c.d`` from dual-stack sockets) becomes IPv4."""
    ip = value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(
        value
    )
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Connection:
    """What authorization looks at: ztunnel's ``rbac::Connection`` (addresses and the peer identity)."""

    src_ip: IpAddress
    dst_ip: IpAddress
    dst_port: int
    src_identity: Optional[str] = None  # verified SPIFFE URI; None for plaintext
    src_port: int = 0

    @classmethod
    def of(
        cls,
        src_ip: Union[str, IpAddress],
        dst_ip: Union[str, IpAddress],
        dst_port: int,
        src_identity: Optional[str] = None,
        src_port: int = 0,
    ) -> Connection:
        return cls(
            _normalize_ip(src_ip), _normalize_ip(dst_ip), int(dst_port), src_identity or None, int(src_port)
        )

    def __str__(self) -> str:
        identity = self.src_identity or "no identity"
        return f"{self.src_ip}:{self.src_port}({identity})->{self.dst_ip}:{self.dst_port}"


class _Subject:
    """Per-connection values computed once, then compared by every match (the hot path)."""

    __slots__ = ("src_ip", "dst_ip", "dst_port", "principal", "namespace", "service_account")

    def __init__(self, conn: Connection) -> None:
        self.src_ip = conn.src_ip
        self.dst_ip = conn.dst_ip
        self.dst_port = conn.dst_port
        identity = conn.src_identity or ""
        # ztunnel: principals are matched with "spiffe://" stripped, and fail without that prefix;
        # namespace is the identity's, or "" without an identity.
        self.principal: Optional[str] = (
            identity[len("spiffe://") :] if identity.startswith("spiffe://") else None
        )
        parsed = SpiffeId.parse(identity) if identity else None
        self.namespace = parsed.namespace if parsed else ""
        self.service_account: Optional[Tuple[str, str]] = (
            (parsed.namespace, parsed.service_account) if parsed else None
        )


# --------------------------------------------------------------------------------------------------
# Matches


@dataclass(frozen=True)
class StringMatch:
    """ztunnel's StringMatch: ``{Exact: s}``, ``{Prefix: s}``, ``{Suffix: s}`` or ``{Presence: []}``."""

    kind: str
    value: str = ""

    def matches(self, check: str) -> bool:
        if self.kind == "Exact":
            return check == self.value
        if self.kind == "Prefix":
            return check.startswith(self.value)
        if self.kind == "Suffix":
            return check.endswith(self.value)
        return check != ""  # Presence

    def matches_principal(self, principal: Optional[str]) -> bool:
        return principal is not None and self.matches(principal)


@dataclass(frozen=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True)
class RbacMatch:
    """One match of a clause; every field is a tuple (empty = not set)."""

    namespaces: Tuple[StringMatch, ...] = ()
    not_namespaces: Tuple[StringMatch, ...] = ()
    service_accounts: FrozenSet[Tuple[str, str]] = frozenset()
    not_service_accounts: FrozenSet[Tuple[str, str]] = frozenset()
    principals: Tuple[StringMatch, ...] = ()
    not_principals: Tuple[StringMatch, ...] = ()
    source_ips: Tuple[IpNetwork, ...] = ()
    not_source_ips: Tuple[IpNetwork, ...] = ()
    destination_ips: Tuple[IpNetwork, ...] = ()
    not_destination_ips: Tuple[IpNetwork, ...] = ()
    destination_ports: FrozenSet[int] = frozenset()
    not_destination_ports: FrozenSet[int] = frozenset()

    def is_empty(self) -> bool:
        return not any(getattr(self, f) for f in self.__dataclass_fields__)

    def matches(self, s: _Subject) -> bool:
        # Cheapest checks first; each returns early as soon as the AND fails.
        if self.destination_ports and s.dst_port not in self.destination_ports:
            return False
        if self.not_destination_ports and s.dst_port in self.not_destination_ports:
            return False
        if self.destination_ips and not _in_any(s.dst_ip, self.destination_ips):
            return False
        if self.not_destination_ips and _in_any(s.dst_ip, self.not_destination_ips):
            return False
        if self.source_ips and not _in_any(s.src_ip, self.source_ips):
            return False
        if self.not_source_ips and _in_any(s.src_ip, self.not_source_ips):
            return False
        if self.service_accounts and s.service_account not in self.service_accounts:
            return False
        if self.not_service_accounts and s.service_account in self.not_service_accounts:
            return False
        if self.principals and not any(p.matches_principal(s.principal) for p in self.principals):
            return False
        if self.not_principals and any(p.matches_principal(s.principal) for p in self.not_principals):
            return False
        if self.namespaces and not any(n.matches(s.namespace) for n in self.namespaces):
            return False
        return not (self.not_namespaces and any(n.matches(s.namespace) for n in self.not_namespaces))


def _in_any(ip: IpAddress, networks: Sequence[IpNetwork]) -> bool:
    # ``in`` is False across address families, as ipnet's contains() is in ztunnel.
    return any(ip in net for net in networks)


@dataclass(frozen=True)
class Authorization:
    """ztunnel's Authorization: one policy."""

    name: str
    namespace: str
    scope: str
    action: str
    rules: Tuple[Tuple[Tuple[RbacMatch, ...], ...], ...]
    dry_run: bool = False

    @property
    def key(self) -> str:
        """``namespace/name``: how workloads reference the policy (ztunnel's ``to_key``)."""
        return f"{self.namespace}/{self.name}"

    def matches(self, conn: Union[Connection, _Subject]) -> bool:
        subject = conn if isinstance(conn, _Subject) else _Subject(conn)
        if not self.rules:
            return False
        return any(all(_clause_matches(clause, subject) for clause in rule) for rule in self.rules)


def _clause_matches(clause: Sequence[RbacMatch], subject: _Subject) -> bool:
    if not clause:
        return True
    return any(not m.is_empty() and m.matches(subject) for m in clause)


# --------------------------------------------------------------------------------------------------
# Parsing ztunnel's local-config form (camelCase, serde's externally tagged enums)


def _enum(value: Any, allowed: Sequence[str], where: str) -> str:
    """Accept ztunnel's spelling (``Allow``) and the upper/lower case forms operators write."""
    if isinstance(value, str):
        for choice in allowed:
            if value.lower() == choice.lower():
                return choice
    raise PolicyError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _parse_string_match(value: Any, where: str) -> StringMatch:
    if isinstance(value, str) and value.lower() == "presence":
        return StringMatch("Presence")
    if not isinstance(value, Mapping) or len(value) != 1:
        raise PolicyError(
            f"{where}: {value!r} is not a string match; write one of {{Exact: s}}, {{Prefix: s}}, "
            "{Suffix: s} or {Presence: []}"
        )
    (raw_kind, raw_value), = value.items()
    kind = _enum(raw_kind, STRING_MATCH_KINDS, where)
    if kind == "Presence":
        if raw_value not in (None, [], {}, ""):
            raise PolicyError(f"{where}: Presence takes no value (write {{Presence: []}})")
        return StringMatch("Presence")
    if not isinstance(raw_value, str):
        raise PolicyError(f"{where}: the {kind} value must be a string, not {raw_value!r}")
    return StringMatch(kind, raw_value)


def _parse_service_account(value: Any, where: str) -> Tuple[str, str]:
    if not isinstance(value, Mapping) or set(value) != {"namespace", "serviceAccount"}:
        raise PolicyError(f"{where}: {value!r} must be {{namespace: <ns>, serviceAccount: <sa>}}")
    ns, sa = value["namespace"], value["serviceAccount"]
    if not isinstance(ns, str) or not isinstance(sa, str):
        raise PolicyError(f"{where}: namespace and serviceAccount must be strings")
    return (ns, sa)


def parse_network(value: Any, where: str = "address") -> IpNetwork:
    """A CIDR (``10.0.0.0/8``, ``fd00::/8``) or a bare address (a /32 or /128).

    Host bits may be set (``10.1.2.3/8`` means ``10.0.0.0/8``), as ipnet accepts them in ztunnel.
    """
    if not isinstance(value, str):
        raise PolicyError(f"{where}: {value!r} is not an address; write a CIDR such as 10.0.0.0/8")
    try:
        return _network(value.strip())
    except ValueError as exc:
        raise PolicyError(f"{where}: {value!r} is not an IP address or CIDR ({exc})") from None


@functools.lru_cache(maxsize=65536)
def _network(text: str) -> IpNetwork:
    # Cached: parsing dominates loading large policy sets, and the same CIDRs recur across policies.
    net = ipaddress.ip_network(text, strict=False)
    mapped = isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None
    if mapped and net.prefixlen >= 96:
        # ::ffff:10.0.0.0/104 is written by dual-stack tooling; compare it as the IPv4 network it is.
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
    return net


def _parse_port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise PolicyError(f"{where}: {value!r} is not a port number (0-65535)")
    return value


def _parse_list(raw: Mapping[str, Any], key: str, where: str) -> List[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{where}.{key}: must be a list, not {type(value).__name__}")
    return value


def parse_match(raw: Any, where: str) -> RbacMatch:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: a match must be a mapping of fields, not {raw!r}")
    unknown = sorted(set(raw) - set(MATCH_FIELDS))
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(MATCH_FIELDS)}")

    def values(key: str, parse: Callable[[Any, str], Any]) -> List[Any]:
        return [parse(v, f"{where}.{key}[{i}]") for i, v in enumerate(_parse_list(raw, key, where))]

    def strings(key: str) -> Tuple[StringMatch, ...]:
        return tuple(values(key, _parse_string_match))

    def accounts(key: str) -> FrozenSet[Tuple[str, str]]:
        return frozenset(values(key, _parse_service_account))

    def networks(key: str) -> Tuple[IpNetwork, ...]:
        return tuple(values(key, parse_network))

    def ports(key: str) -> FrozenSet[int]:
        return frozenset(values(key, _parse_port))

    return RbacMatch(
        namespaces=strings("namespaces"),
        not_namespaces=strings("notNamespaces"),
        service_accounts=accounts("serviceAccounts"),
        not_service_accounts=accounts("notServiceAccounts"),
        principals=strings("principals"),
        not_principals=strings("notPrincipals"),
        source_ips=networks("sourceIps"),
        not_source_ips=networks("notSourceIps"),
        destination_ips=networks("destinationIps"),
        not_destination_ips=networks("notDestinationIps"),
        destination_ports=ports("destinationPorts"),
        not_destination_ports=ports("notDestinationPorts"),
    )


def parse_policy(raw: Any, index: int = 0) -> Authorization:
    """One policy of the mesh state's ``policies`` list; PolicyError names what to fix."""
    where = f"policies[{index}]"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: a policy must be a mapping, not {raw!r}")
    name, namespace = raw.get("name"), raw.get("namespace")
    if isinstance(name, str) and name:
        where = f"policy {namespace}/{name} ({where})"
    unknown = sorted(set(raw) - set(POLICY_FIELDS))
    if unknown:
        known = ", ".join(POLICY_FIELDS)
        raise PolicyError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {known}")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}: 'name' is required (a non-empty string)")
    if not isinstance(namespace, str):
        raise PolicyError(f"{where}: 'namespace' is required (a string; \"\" only for Global policies)")
    scope = _enum(raw.get("scope"), SCOPES, f"{where}.scope")
    if scope == "Namespace" and not namespace:
        raise PolicyError(f"{where}: a Namespace-scoped policy needs its 'namespace'")
    action = _enum(raw.get("action"), ACTIONS, f"{where}.action")
    dry_run = raw.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise PolicyError(f"{where}.dryRun: must be true or false, not {dry_run!r}")
    rules_raw = raw.get("rules", [])
    if rules_raw is None:
        rules_raw = []
    if not isinstance(rules_raw, list):
        raise PolicyError(f"{where}.rules: must be a list of rules (each a list of clauses of matches)")
    rules = []
    for r, rule in enumerate(rules_raw):
        if not isinstance(rule, list):
            raise PolicyError(f"{where}.rules[{r}]: a rule is a list of clauses")
        clauses = []
        for c, clause in enumerate(rule):
            if not isinstance(clause, list):
                raise PolicyError(f"{where}.rules[{r}][{c}]: a clause is a list of matches")
            clause_where = f"{where}.rules[{r}][{c}]"
            clauses.append(tuple(parse_match(m, f"{clause_where}[{i}]") for i, m in enumerate(clause)))
        rules.append(tuple(clauses))
    return Authorization(name, namespace, scope, action, tuple(rules), dry_run)


# --------------------------------------------------------------------------------------------------
# The index and the decision


@dataclass(frozen=True)
class Verdict:
    """The outcome of one evaluation, with what decided it (for access logs and the 401 body)."""

    allowed: bool
    reason: str
    policy: Optional[str] = None  # key of the deciding policy, if one decided
    dry_run_matches: Tuple[str, ...] = ()  # dry-run policies that matched, "<key> (Allow|Deny)"
    dry_run_would_deny: bool = False  # the decision would be "deny" if the dry-run policies were enforced


@dataclass
class PolicyIndex:
    """Policies indexed by scope, ztunnel's PolicyStore: global, per namespace, and by key."""

    by_key: Dict[str, Authorization] = field(default_factory=dict)
    global_keys: Tuple[str, ...] = ()
    by_namespace: Dict[str, Tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, policies: Iterable[Authorization]) -> PolicyIndex:
        by_key: Dict[str, Authorization] = {}
        for pol in policies:
            if pol.key in by_key:
                raise PolicyError(
                    f"policy {pol.key} is defined twice; policy keys (namespace/name) must be unique"
                )
            by_key[pol.key] = pol
        global_keys: List[str] = []
        by_namespace: Dict[str, List[str]] = {}
        for key, pol in by_key.items():
            if pol.scope == "Global":
                global_keys.append(key)
            elif pol.scope == "Namespace":
                by_namespace.setdefault(pol.namespace, []).append(key)
        return cls(by_key, tuple(global_keys), {ns: tuple(keys) for ns, keys in by_namespace.items()})

    @classmethod
    def from_raw(cls, raw_policies: Any) -> PolicyIndex:
        """From the mesh state's ``policies`` list (None or missing = no policies)."""
        if raw_policies is None:
            return cls.build(())
        if not isinstance(raw_policies, list):
            raise PolicyError("'policies' must be a list of policies")
        return cls.build(parse_policy(p, i) for i, p in enumerate(raw_policies))

    def __len__(self) -> int:
        return len(self.by_key)

    def applicable(self, namespace: str, workload_policy_keys: Iterable[str] = ()) -> List[Authorization]:
        """The policies that apply to a destination workload, each once, in ztunnel's order
        (namespace, global, then the workload's own list). Unknown keys are skipped, as ztunnel does
        while the control plane catches up."""
        seen = set()
        out: List[Authorization] = []
        for key in (*self.by_namespace.get(namespace, ()), *self.global_keys, *workload_policy_keys):
            if key in seen:
                continue
            seen.add(key)
            pol = self.by_key.get(key)
            if pol is None:
                log.warning("workload references unknown authorization policy %s; skipping it", key)
                continue
            out.append(pol)
        return out

    def evaluate(
        self, conn: Connection, namespace: str, workload_policy_keys: Iterable[str] = ()
    ) -> Verdict:
        return evaluate(self.applicable(namespace, workload_policy_keys), conn)


def evaluate(policies: Sequence[Authorization], conn: Connection) -> Verdict:
    """ztunnel's assert_rbac over ``policies`` (those applicable to the destination)."""
    subject = _Subject(conn)
    allow: List[Authorization] = []
    deny: List[Authorization] = []
    dry_allow: List[Authorization] = []
    dry_deny: List[Authorization] = []
    for pol in policies:
        if pol.action == "Allow":
            (dry_allow if pol.dry_run else allow).append(pol)
        else:
            (dry_deny if pol.dry_run else deny).append(pol)

    dry_matches: List[str] = []
    dry_would_deny = False
    for pol in dry_deny:
        if pol.matches(subject):
            dry_matches.append(f"{pol.key} (Deny)")
            dry_would_deny = True
            log.info("dry-run: DENY policy %s matches %s (not enforced)", pol.key, conn)

    for pol in deny:
        if pol.matches(subject):
            return Verdict(False, f"denied by DENY policy {pol.key}", pol.key, tuple(dry_matches), True)

    dry_allow_matched = False
    for pol in dry_allow:
        if pol.matches(subject):
            dry_allow_matched = True
            dry_matches.append(f"{pol.key} (Allow)")
            log.info("dry-run: ALLOW policy %s matches %s (not enforced)", pol.key, conn)

    if not allow:
        if dry_allow and not dry_allow_matched:
            dry_would_deny = True
            log.info("dry-run: no ALLOW policy matches %s; enforcing them would deny it", conn)
        return Verdict(True, "allowed: no ALLOW policy applies", None, tuple(dry_matches), dry_would_deny)

    for pol in allow:
        if pol.matches(subject):
            reason = f"allowed by ALLOW policy {pol.key}"
            return Verdict(True, reason, pol.key, tuple(dry_matches), dry_would_deny)

    names = ", ".join(p.key for p in allow)
    reason = f"denied: no ALLOW policy matches (applicable: {names})"
    return Verdict(False, reason, None, tuple(dry_matches), True)


# --------------------------------------------------------------------------------------------------
# The hook the data plane calls


def workload_scope(workload: Any) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """(namespace, authorizationPolicies) of a destination workload (ztproxy.state.Workload)."""
    if workload is None:
        return None
    namespace = getattr(workload, "namespace", None)
    if not isinstance(namespace, str):
        return None
    return namespace, tuple(getattr(workload, "authorization_policies", ()) or ())


class MeshAuthorizer:
    """The data plane's Authorizer (ztproxy.hooks): evaluates the current policy index.

    ``update(raw_policies)`` builds a new index and swaps it in only when every policy is valid: a
    malformed reload raises PolicyError and leaves the previous policies in force. As ztunnel, a
    connection whose destination is not a workload of the mesh state is denied.

    With ``state_provider`` (returning the current ztproxy.state.MeshState), the authorizer follows the
    mesh state by itself: before each decision it checks whether the state object changed and, if so,
    indexes its ``policies``. The check is an identity comparison, so it is free when nothing changed,
    and no connection is ever decided against policies older than the state that routed it. When the
    very first policies are malformed, nothing is known to be safe, and every connection is denied
    (fail closed) until a valid state arrives.
    """

    def __init__(self, raw_policies: Any = None, state_provider: Optional[Callable[[], Any]] = None) -> None:
        self._parsed: Dict[str, Authorization] = {}
        self._index = PolicyIndex.build(())
        self._state_provider = state_provider
        self._state: Any = None
        self._invalid: Optional[str] = None  # why no valid policy set was ever loaded
        if state_provider is None:
            self.update(raw_policies)

    def _follow_state(self) -> None:
        state = self._state_provider() if self._state_provider is not None else None
        if state is None or state is self._state:
            return
        first = self._state is None
        self._state = state
        try:
            self.update(getattr(state, "policies", None))
            self._invalid = None
        except PolicyError as exc:
            if first:
                self._invalid = str(exc)
                log.error("authorization policies are invalid, denying every connection until fixed: %s", exc)
            else:
                log.error("new authorization policies rejected, keeping the previous ones: %s", exc)

    @property
    def index(self) -> PolicyIndex:
        return self._index

    def update(self, raw_policies: Any) -> PolicyIndex:
        """Replace the policies. A reload reuses the parsed form of every policy whose text did not
        change, so reloading a large, mostly unchanged policy set stays cheap."""
        if raw_policies is None:
            raw_policies = []
        if not isinstance(raw_policies, list):
            raise PolicyError("'policies' must be a list of policies")
        parsed: Dict[str, Authorization] = {}
        policies = []
        for i, raw in enumerate(raw_policies):
            try:
                text = json.dumps(raw, sort_keys=True, default=str)
            except (TypeError, ValueError):
                text = None
            pol = self._parsed.get(text) if text is not None else None
            if pol is None:
                pol = parse_policy(raw, i)
            if text is not None:
                parsed[text] = pol
            policies.append(pol)
        index = PolicyIndex.build(policies)
        self._parsed = parsed
        self._index = index
        log.info("authorization policies loaded: %d", len(index))
        return index

    def verdict(self, conn: ConnContext) -> Verdict:
        self._follow_state()
        if self._invalid is not None:
            return Verdict(False, f"denied: authorization policies are invalid ({self._invalid})")
        # Only a peer certificate proves an identity: on a plaintext connection any identity the context
        # carries was inferred from the source address, and policies must not trust it (ztunnel: None).
        identity = conn.src_identity if conn.security_policy == "mutual_tls" else None
        connection = Connection.of(conn.src_ip, conn.dst_ip, conn.dst_port, identity, conn.src_port)
        scope = workload_scope(conn.dst_workload)
        if scope is None:
            reason = f"denied: destination {connection.dst_ip} is not a workload of the mesh state"
            return Verdict(False, reason)
        namespace, keys = scope
        return self._index.evaluate(connection, namespace, keys)

    def authorize(self, conn: ConnContext) -> Decision:
        verdict = self.verdict(conn)
        if verdict.allowed:
            log.debug("%s: %s", verdict.reason, conn.src_ip)
        else:
            log.info(
                "connection %s:%s (%s) -> %s:%s %s",
                conn.src_ip, conn.src_port, conn.src_identity or "no identity", conn.dst_ip, conn.dst_port,
                verdict.reason,
            )
        return Decision(verdict.allowed, verdict.reason)
