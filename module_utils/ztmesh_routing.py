"""Policy routing: ip rules in an owned priority range and routes in owned tables, through pyroute2.

Ownership is exact and explicit: every IPv4 rule whose priority lies in the owned range, and every
IPv4 route in an owned table, is ztmesh's (others there are removed); rules and routes elsewhere are
never touched, except routes listed in a table ztmesh does not own (main), which are added or
replaced but never swept. IPv6 is not managed.

Everything is validated and the complete plan computed before the first netlink write. Writes are
ordered so traffic never falls into a gap: additions and replacements before deletions, link routes
before the routes whose gateway they make reachable, and the ``lookup local`` rule is added at its new
priority before the one at priority 0 is deleted (and restored at 0 before the moved one is deleted).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

TABLE_NAMES = {"default": 253, "main": 254, "local": 255}
TABLE_IDS = {v: k for k, v in TABLE_NAMES.items()}
# Tables the kernel fills itself: never owned (sweeping them would drop the node's own routes).
UNOWNABLE_TABLES = frozenset((0, 253, 254, 255))
# Priorities of the kernel's default rules (0 local, 32766 main, 32767 default).
DEFAULT_RULE_PRIORITIES = (0, 32766, 32767)
MAX_PRIORITY = 0xFFFFFFFF
SCOPES = {"global": 0, "link": 253, "host": 254}
SCOPE_NAMES = {v: k for k, v in SCOPES.items()}
ROUTE_TYPES = {"unicast": 1, "local": 2}
ROUTE_TYPE_NAMES = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
}
FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2
RTNH_F_ONLINK = 4
RTPROT_STATIC = 4
MAX_IFNAME = 15


class RoutingError(Exception):
    """Invalid desired state or a failed netlink request; the message tells the operator what to do."""


# ---------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class Rule:
    priority: int
    table: Optional[int] = None  # lookup TABLE (action to-table)
    goto: Optional[int] = None  # goto PRIORITY (action goto)
    fwmark: Optional[int] = None
    fwmask: Optional[int] = None
    src: Optional[str] = None  # CIDR
    dst: Optional[str] = None
    iif: Optional[str] = None
    oif: Optional[str] = None
    action: int = FR_ACT_TO_TBL
    extra: Tuple = ()  # attributes ztmesh does not manage (uidrange, tos, ...): never equal to a desired rule

    def text(self) -> str:
        words = [f"{self.priority}:", "from", self.src or "all"]
        if self.dst:
            words += ["to", self.dst]
        if self.fwmark is not None:
            words += [
                "fwmark",
                f"{self.fwmark:#x}/{(self.fwmask if self.fwmask is not None else 0xFFFFFFFF):#x}",
            ]
        if self.iif:
            words += ["iif", self.iif]
        if self.oif:
            words += ["oif", self.oif]
        if self.action == FR_ACT_GOTO:
            words += ["goto", str(self.goto)]
        elif self.action == FR_ACT_TO_TBL:
            words += ["lookup", table_text(self.table)]
        else:
            words += ["action", str(self.action)]
        words += [f"[{e}]" for e in self.extra]
        return " ".join(words)


@dataclass(frozen=True)
class Route:
    table: int
    dst: str  # CIDR; 0.0.0.0/0 is the default route
    type: int = 1
    gateway: Optional[str] = None
    dev: Optional[str] = None
    scope: int = 0
    onlink: bool = False
    src: Optional[str] = None
    metric: int = 0
    extra: Tuple = ()

    @property
    def key(self) -> Tuple[int, str, int]:
        """What the kernel keys an IPv4 route on (TOS aside): replacing one with this key is atomic."""
        return (self.table, self.dst, self.metric)

    def text(self) -> str:
        words = []
        if self.type != 1:
            words.append(ROUTE_TYPE_NAMES.get(self.type, str(self.type)))
        words.append("default" if self.dst == "0.0.0.0/0" and self.type == 1 else self.dst)
        if self.gateway:
            words += ["via", self.gateway]
        if self.dev:
            words += ["dev", self.dev]
        words += ["table", table_text(self.table)]
        if self.scope != default_scope(self.type, self.gateway):
            words += ["scope", SCOPE_NAMES.get(self.scope, str(self.scope))]
        if self.onlink:
            words.append("onlink")
        if self.src:
            words += ["src", self.src]
        if self.metric:
            words += ["metric", str(self.metric)]
        words += [f"[{e}]" for e in self.extra]
        return " ".join(words)


def table_text(table: Optional[int]) -> str:
    return TABLE_IDS.get(table, str(table)) if table is not None else "?"


def default_scope(route_type: int, gateway: Optional[str]) -> int:
    """The scope ``ip route`` picks: host for local routes, link without a gateway, else global."""
    if route_type == ROUTE_TYPES["local"]:
        return SCOPES["host"]
    return SCOPES["global"] if gateway else SCOPES["link"]


# ---------------------------------------------------------------------------------------------------
# Validation (pure)


def parse_table(value, where: str) -> int:
    if isinstance(value, str) and value.strip() in TABLE_NAMES:
        return TABLE_NAMES[value.strip()]
    try:
        number = int(str(value).strip(), 0)
    except (TypeError, ValueError):
        raise RoutingError(
            f"{where}: table {value!r} is not a number or one of main, local, default"
        ) from None
    if not 1 <= number <= MAX_PRIORITY:
        raise RoutingError(f"{where}: table {number} is out of range (1..{MAX_PRIORITY})")
    return number


def parse_u32(value, what: str, where: str) -> int:
    try:
        number = value if isinstance(value, int) else int(str(value).strip(), 0)
    except (TypeError, ValueError):
        raise RoutingError(f"{where}: {what} {value!r} is not an integer (decimal or 0x hex)") from None
    if not 0 <= number <= MAX_PRIORITY:
        raise RoutingError(f"{where}: {what} {value!r} is out of range (0..0xffffffff)")
    return number


def parse_prefix(value, what: str, where: str) -> str:
    try:
        net = ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(str(value).strip(), strict=False)
            raise RoutingError(f"{where}: {what} {value} has host bits set; write {fixed}") from None
        raise RoutingError(f"{where}: {what} {value!r} is not an IPv4 address or CIDR") from None
    if net.version != 4:
        raise RoutingError(f"{where}: {what} {value} is IPv6; ztmesh_routing manages IPv4 only")
    return str(net)


def parse_address(value, what: str, where: str) -> str:
    try:
        addr = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise RoutingError(f"{where}: {what} {value!r} is not an IPv4 address") from None
    if addr.version != 4:
        raise RoutingError(f"{where}: {what} {value} is IPv6; ztmesh_routing manages IPv4 only")
    return str(addr)


def parse_ifname(value, what: str, where: str) -> Optional[str]:
    if value is None:
        return None
    name = str(value)
    if not name or len(name) > MAX_IFNAME or "/" in name or any(c.isspace() for c in name):
        raise RoutingError(f"{where}: {what} {name!r} is not a valid interface name (1..15 characters)")
    return name


def desired_rule(item: dict) -> Rule:
    where = f"rule {item.get('priority')!r}"
    if item.get("priority") is None:
        raise RoutingError("every rule needs a priority")
    priority = parse_u32(item["priority"], "priority", where)
    where = f"rule {priority}"
    if priority in DEFAULT_RULE_PRIORITIES:
        raise RoutingError(
            f"{where}: priorities 0, 32766 and 32767 hold the kernel's default rules; pick another"
        )
    mark, mask = item.get("fwmark"), item.get("fwmask")
    if (mark is None) != (mask is None):
        raise RoutingError(
            f"{where}: fwmark and fwmask go together (a mark without a mask matches the whole 32-bit "
            f"mark, which is rarely meant); give both, e.g. fwmark: 0x200, fwmask: 0x200"
        )
    table, goto = item.get("table"), item.get("goto")
    if (table is None) == (goto is None):
        raise RoutingError(f"{where}: give exactly one of table (lookup) or goto (jump to a priority)")
    action = FR_ACT_TO_TBL
    table_id = goto_prio = None
    if table is not None:
        table_id = parse_table(table, where)
    else:
        action = FR_ACT_GOTO
        goto_prio = parse_u32(goto, "goto", where)
        if goto_prio <= priority:
            raise RoutingError(f"{where}: goto {goto_prio} must point to a later (higher) priority")
    return Rule(
        priority=priority,
        table=table_id,
        goto=goto_prio,
        fwmark=None if mark is None else parse_u32(mark, "fwmark", where),
        fwmask=None if mask is None else parse_u32(mask, "fwmask", where),
        src=None if item.get("from") is None else parse_prefix(item["from"], "from", where),
        dst=None if item.get("to") is None else parse_prefix(item["to"], "to", where),
        iif=parse_ifname(item.get("iif"), "iif", where),
        oif=parse_ifname(item.get("oif"), "oif", where),
        action=action,
    )


def desired_route(item: dict) -> Route:
    where = f"route {item.get('dst')!r} (table {item.get('table')!r})"
    if item.get("table") is None:
        raise RoutingError(f"{where}: every route needs a table")
    table = parse_table(item["table"], where)
    dst_raw = item.get("dst")
    if dst_raw is None:
        raise RoutingError(f"{where}: every route needs dst (a CIDR or 'default')")
    dst = "0.0.0.0/0" if str(dst_raw).strip() == "default" else parse_prefix(dst_raw, "dst", where)
    type_name = item.get("type") or "unicast"
    if type_name not in ROUTE_TYPES:
        raise RoutingError(f"{where}: type must be unicast or local, not {type_name!r}")
    route_type = ROUTE_TYPES[type_name]
    gateway = None if item.get("gateway") is None else parse_address(item["gateway"], "gateway", where)
    dev = parse_ifname(item.get("dev"), "dev", where)
    if route_type == ROUTE_TYPES["local"] and gateway:
        raise RoutingError(f"{where}: a local route has no gateway")
    if not gateway and not dev:
        raise RoutingError(f"{where}: give dev (and/or gateway) so the kernel knows where the route goes")
    onlink = bool(item.get("onlink"))
    if onlink and not (gateway and dev):
        raise RoutingError(f"{where}: onlink needs both gateway and dev")
    scope_name = item.get("scope")
    if scope_name is not None and scope_name not in SCOPES:
        raise RoutingError(f"{where}: scope must be global, link or host, not {scope_name!r}")
    scope = SCOPES[scope_name] if scope_name is not None else default_scope(route_type, gateway)
    if gateway and scope != SCOPES["global"]:
        raise RoutingError(f"{where}: a route via a gateway has scope global (the kernel refuses link/host)")
    metric = parse_u32(item.get("metric") or 0, "metric", where)
    src = None if item.get("src") is None else parse_address(item["src"], "src", where)
    return Route(
        table=table,
        dst=dst,
        type=route_type,
        gateway=gateway,
        dev=dev,
        scope=scope,
        onlink=onlink,
        src=src,
        metric=metric,
    )


@dataclass
class RoutingSpec:
    rules: List[Rule]
    priority_range: Optional[Tuple[int, int]]
    routes: List[Route]
    tables: List[int]
    local_rule_priority: Optional[int]


def spec_from_params(params: dict) -> RoutingSpec:
    rules = [desired_rule(dict(r)) for r in params.get("rules") or []]
    seen_rules = set()
    for rule in rules:
        if rule in seen_rules:
            raise RoutingError(f"rule {rule.text()} is listed twice; list it once")
        seen_rules.add(rule)
    local = params.get("local_rule_priority")
    if local is not None:
        local = parse_u32(local, "local_rule_priority", "local_rule_priority")
        if local in DEFAULT_RULE_PRIORITIES:
            raise RoutingError("local_rule_priority must not be 0, 32766 or 32767 (pick e.g. 200)")
    bounds = params.get("rule_priorities")
    prange: Optional[Tuple[int, int]] = None
    if bounds is not None:
        if len(bounds) != 2:
            raise RoutingError("rule_priorities is [first, last], two priorities")
        first, last = (parse_u32(b, "rule_priorities", "rule_priorities") for b in bounds)
        if first > last:
            raise RoutingError(f"rule_priorities [{first}, {last}]: first must not be above last")
        prange = (first, last)
    elif rules:
        prange = (min(r.priority for r in rules), max(r.priority for r in rules))
    if prange:
        for rule in rules:
            if not prange[0] <= rule.priority <= prange[1]:
                raise RoutingError(
                    f"rule {rule.priority} lies outside rule_priorities {list(prange)}; widen the range"
                )
        clash = [p for p in DEFAULT_RULE_PRIORITIES if prange[0] <= p <= prange[1]]
        if clash:
            raise RoutingError(
                f"rule_priorities {list(prange)} covers the kernel default rule(s) at {clash}; "
                f"ztmesh would delete them: narrow the range"
            )
    routes = [desired_route(dict(r)) for r in params.get("routes") or []]
    keys: Dict[Tuple, Route] = {}
    for route in routes:
        if route.key in keys:
            raise RoutingError(
                f"routes {keys[route.key].text()!r} and {route.text()!r} share table, dst and metric; "
                f"the kernel keeps one route per (table, dst, metric): keep one or change a metric"
            )
        keys[route.key] = route
    tables_param = params.get("tables")
    if tables_param is None:
        tables = sorted({r.table for r in routes if r.table not in UNOWNABLE_TABLES})
    else:
        tables = sorted({parse_table(t, "tables") for t in tables_param})
        bad = [t for t in tables if t in UNOWNABLE_TABLES]
        if bad:
            raise RoutingError(
                f"tables {bad}: main, local and default hold the kernel's own routes and cannot be owned; "
                f"list routes in them under routes without owning the table"
            )
    return RoutingSpec(
        rules=rules, priority_range=prange, routes=routes, tables=tables, local_rule_priority=local
    )


# ---------------------------------------------------------------------------------------------------
# Reading kernel state (netlink messages -> model)


def _attrs(msg) -> dict:
    return dict(msg.get("attrs") or [])


_RULE_IGNORED_ATTRS = frozenset(
    (
        "FRA_TABLE",
        "FRA_PRIORITY",
        "FRA_FWMARK",
        "FRA_FWMASK",
        "FRA_GOTO",
        "FRA_SRC",
        "FRA_DST",
        "FRA_IIFNAME",
        "FRA_OIFNAME",
        "FRA_PROTOCOL",
        "FRA_SUPPRESS_PREFIXLEN",
        "FRA_UNSPEC",
    )
)


def rule_from_msg(msg) -> Rule:
    attrs = _attrs(msg)
    action = msg.get("action")
    table = attrs.get("FRA_TABLE") or msg.get("table")
    extra = []
    for name, value in sorted(attrs.items()):
        if name in _RULE_IGNORED_ATTRS:
            continue
        if name == "FRA_SUPPRESS_IFGROUP" and value in (0xFFFFFFFF, -1):
            continue
        extra.append(f"{name}={value}")
    suppress = attrs.get("FRA_SUPPRESS_PREFIXLEN")
    if suppress not in (None, 0xFFFFFFFF, -1):
        extra.append(f"suppress_prefixlength={suppress}")
    if msg.get("tos"):
        extra.append(f"tos={msg.get('tos')}")
    if msg.get("flags") and msg.get("flags") & 0x2:  # FIB_RULE_INVERT ("not")
        extra.append("not")

    def prefix(addr_key: str, len_key: str) -> Optional[str]:
        addr = attrs.get(addr_key)
        return None if addr is None else f"{addr}/{msg.get(len_key)}"

    mark = attrs.get("FRA_FWMARK")
    mask = attrs.get("FRA_FWMASK")
    if mark is not None and mask is None:
        mask = 0xFFFFFFFF
    if mark is None and mask is not None:
        # The kernel leaves FRA_FWMARK out when the mark is 0: "fwmark 0/0x200" (mark bit clear)
        # arrives as a mask alone.
        mark = 0
    return Rule(
        priority=attrs.get("FRA_PRIORITY", 0),
        table=table if action == FR_ACT_TO_TBL else None,
        goto=attrs.get("FRA_GOTO") if action == FR_ACT_GOTO else None,
        fwmark=mark,
        fwmask=mask,
        src=prefix("FRA_SRC", "src_len"),
        dst=prefix("FRA_DST", "dst_len"),
        iif=attrs.get("FRA_IIFNAME"),
        oif=attrs.get("FRA_OIFNAME"),
        action=action,
        extra=tuple(extra),
    )


_ROUTE_IGNORED_ATTRS = frozenset(
    (
        "RTA_TABLE",
        "RTA_DST",
        "RTA_GATEWAY",
        "RTA_OIF",
        "RTA_PREFSRC",
        "RTA_PRIORITY",
        "RTA_CACHEINFO",
        "RTA_UNSPEC",
        "RTA_PREF",
    )
)


def route_from_msg(msg, ifnames: Dict[int, str]) -> Route:
    attrs = _attrs(msg)
    extra = [f"{k}" for k in sorted(attrs) if k not in _ROUTE_IGNORED_ATTRS]
    if msg.get("tos"):
        extra.append(f"tos={msg.get('tos')}")
    dst = attrs.get("RTA_DST") or "0.0.0.0"
    oif = attrs.get("RTA_OIF")
    return Route(
        table=attrs.get("RTA_TABLE") or msg.get("table"),
        dst=f"{dst}/{msg.get('dst_len')}",
        type=msg.get("type"),
        gateway=attrs.get("RTA_GATEWAY"),
        dev=ifnames.get(oif, str(oif)) if oif is not None else None,
        scope=msg.get("scope"),
        onlink=bool(msg.get("flags", 0) & RTNH_F_ONLINK),
        src=attrs.get("RTA_PREFSRC"),
        metric=attrs.get("RTA_PRIORITY") or 0,
        extra=tuple(extra),
    )


def is_local_rule(rule: Rule) -> bool:
    """The kernel's ``from all lookup local`` rule (at whatever priority)."""
    return (
        rule.action == FR_ACT_TO_TBL
        and rule.table == TABLE_NAMES["local"]
        and rule.fwmark is None
        and not rule.src
        and not rule.dst
        and not rule.iif
        and not rule.oif
        and not rule.extra
    )


# ---------------------------------------------------------------------------------------------------
# Planning (pure)


@dataclass
class Step:
    """One netlink write: ``kind`` is rule-add/rule-del/route-replace/route-del."""

    kind: str
    obj: object

    def text(self) -> str:
        return f"{self.kind} {self.obj.text()}"


@dataclass
class RoutingPlan:
    steps: List[Step] = field(default_factory=list)
    before: Dict[str, List[str]] = field(default_factory=dict)
    after: Dict[str, List[str]] = field(default_factory=dict)


def _in_range(rule: Rule, prange: Optional[Tuple[int, int]]) -> bool:
    return bool(prange) and prange[0] <= rule.priority <= prange[1]


def _local_rule(priority: int) -> Rule:
    return Rule(priority=priority, table=TABLE_NAMES["local"])


def _route_order(route: Route) -> Tuple:
    # Link routes first: a later route's gateway may only be reachable through them.
    return (route.gateway is not None, route.table, route.dst, route.metric)


def plan_routing(
    spec: RoutingSpec, rules: Sequence[Rule], routes: Sequence[Route], present: bool
) -> RoutingPlan:
    plan = RoutingPlan()
    local_now = [r for r in rules if is_local_rule(r)]
    has_local0 = any(r.priority == 0 for r in local_now)
    lp = spec.local_rule_priority
    has_moved = lp is not None and any(r.priority == lp for r in local_now)

    # 1. The local rule, first when moving it so local delivery never has a gap.
    owned_rules_now = [
        r
        for r in rules
        if _in_range(r, spec.priority_range)
        and not (lp is not None and is_local_rule(r) and r.priority == lp)
    ]
    if lp is not None:
        if present:
            if not has_moved:
                plan.steps.append(Step("rule-add", _local_rule(lp)))
            if has_local0:
                plan.steps.append(Step("rule-del", _local_rule(0)))
        else:
            if not has_local0:
                plan.steps.append(Step("rule-add", _local_rule(0)))
            if has_moved:
                plan.steps.append(Step("rule-del", _local_rule(lp)))

    # 2. Rules of the owned range: add missing, then remove the others.
    wanted_rules = list(spec.rules) if present else []
    for rule in wanted_rules:
        if rule not in owned_rules_now:
            plan.steps.append(Step("rule-add", rule))
    seen = set()
    for rule in owned_rules_now:
        if rule in wanted_rules and rule not in seen:
            seen.add(rule)  # a duplicate of a wanted rule is still removed
            continue
        plan.steps.append(Step("rule-del", rule))

    # 3. Routes: replace (atomic per key) what differs, then sweep owned tables.
    wanted_routes = sorted(spec.routes, key=_route_order) if present else []
    current_by_key: Dict[Tuple, List[Route]] = {}
    for route in routes:
        current_by_key.setdefault(route.key, []).append(route)
    for route in wanted_routes:
        if route not in current_by_key.get(route.key, []):
            plan.steps.append(Step("route-replace", route))
    wanted_set = set(wanted_routes)
    replaced_keys = {s.obj.key for s in plan.steps if s.kind == "route-replace"}
    overwritten = set()
    for route in routes:
        if route.table in spec.tables:
            if route in wanted_set:
                continue
            if route.key in replaced_keys and route.key not in overwritten:
                overwritten.add(route.key)  # the replace overwrites it in place (no gap)
                continue
            plan.steps.append(Step("route-del", route))
        elif not present and route in spec.routes:
            plan.steps.append(Step("route-del", route))

    # Before/after views of what the module owns.
    # The local rule is part of what the module owns only when it manages its priority.
    local_view_now = [r.text() for r in local_now] if lp is not None else []
    plan.before = {
        "rules": [r.text() for r in owned_rules_now] + local_view_now,
        "routes": [r.text() for r in routes if r.table in spec.tables or r in spec.routes],
    }
    after_local = [_local_rule(lp if present else 0).text()] if lp is not None else local_view_now
    after_routes = [r.text() for r in wanted_routes]
    plan.after = {
        "rules": [r.text() for r in wanted_rules] + after_local,
        "routes": after_routes,
    }
    return plan


def render_view(view: Dict[str, List[str]]) -> str:
    out = []
    for section in ("rules", "routes"):
        out.append(f"# {section}")
        out.extend(view.get(section, []))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------
# Kernel interface (pyroute2)


def ipr_open():
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise RoutingError(
            "pyroute2 is not installed on this node; install python3-pyroute2 (pip: pyroute2)"
        ) from None
    return IPRoute()


def read_state(ipr) -> Tuple[List[Rule], List[Route], Dict[int, str], Dict[str, List[Tuple[str, int]]]]:
    """IPv4 rules, IPv4 routes of all tables, ifindex->name, and ifname->[(address, prefixlen)]."""
    links = {link["index"]: dict(link["attrs"]).get("IFLA_IFNAME") for link in ipr.get_links()}
    addrs: Dict[str, List[Tuple[str, int]]] = {}
    for addr in ipr.get_addr(family=socket.AF_INET):
        name = links.get(addr["index"])
        local = dict(addr["attrs"]).get("IFA_ADDRESS")
        if name and local:
            addrs.setdefault(name, []).append((local, addr["prefixlen"]))
    rules = [rule_from_msg(m) for m in ipr.get_rules(family=socket.AF_INET)]
    routes = [route_from_msg(m, links) for m in ipr.get_routes(family=socket.AF_INET)]
    return rules, routes, links, addrs


def check_devices_and_gateways(
    spec: RoutingSpec, links: Dict[int, str], addrs: Dict[str, List[Tuple[str, int]]], routes: Sequence[Route]
) -> None:
    names = set(links.values())
    for route in spec.routes:
        if route.dev and route.dev not in names:
            raise RoutingError(
                f"route {route.text()!r}: device {route.dev!r} does not exist in this network namespace; "
                f"create it first (ztmesh_netns/ztmesh_tunnel) or fix dev"
            )
    for route in spec.routes:
        if not route.gateway or route.onlink:
            continue
        gw = ipaddress.ip_address(route.gateway)
        candidates = [
            ipaddress.ip_network(f"{a}/{p}", strict=False) for a, p in addrs.get(route.dev or "", [])
        ]
        link_routes = [
            r
            for r in list(routes) + list(spec.routes)
            if r.gateway is None
            and r.type == 1
            and (r.dev == route.dev or route.dev is None)
            and r.table in (route.table, TABLE_NAMES["main"])
        ]
        candidates += [ipaddress.ip_network(r.dst) for r in link_routes]
        if route.dev is None:
            candidates += [
                ipaddress.ip_network(f"{a}/{p}", strict=False) for v in addrs.values() for a, p in v
            ]
        local = [a for v in addrs.values() for a, _p in v]
        if route.gateway in local:
            raise RoutingError(
                f"route {route.text()!r}: gateway {route.gateway} is an address of this host; the gateway "
                f"must be a neighbour (for example the far end of the veth)"
            )
        for address, plen in addrs.get(route.dev or "", []):
            net = ipaddress.ip_network(f"{address}/{plen}", strict=False)
            if plen < 31 and gw in (net.broadcast_address, net.network_address):
                raise RoutingError(
                    f"route {route.text()!r}: gateway {route.gateway} is the network or broadcast address of "
                    f"{net} on {route.dev}; use the neighbour's own address"
                )
        if not any(gw in net for net in candidates):
            raise RoutingError(
                f"route {route.text()!r}: gateway {route.gateway} is not directly reachable"
                + (f" through {route.dev}" if route.dev else "")
                + " (no address or link route there covers it); fix the gateway or dev, or set onlink: true "
                "when the gateway is on that link anyway (for example a peer at the far end of a veth)"
            )


def _rule_kwargs(rule: Rule) -> dict:
    kwargs = {"priority": rule.priority, "family": socket.AF_INET}
    if rule.action == FR_ACT_GOTO:
        kwargs.update(action="FR_ACT_GOTO", goto=rule.goto)
    else:
        kwargs.update(action="FR_ACT_TO_TBL", table=rule.table)
    if rule.fwmark is not None:
        kwargs.update(fwmark=rule.fwmark, fwmask=rule.fwmask)
    for key, value in (("src", rule.src), ("dst", rule.dst)):
        if value:
            addr, plen = value.split("/")
            kwargs.update({key: addr, f"{key}_len": int(plen)})
    if rule.iif:
        kwargs["iifname"] = rule.iif
    if rule.oif:
        kwargs["oifname"] = rule.oif
    return kwargs


def _route_kwargs(route: Route, ifindex: Dict[str, int]) -> dict:
    addr, plen = route.dst.split("/")
    kwargs = {
        "family": socket.AF_INET,
        "table": route.table,
        "dst": addr,
        "dst_len": int(plen),
        "type": route.type,
        "scope": route.scope,
        "priority": route.metric,
        "proto": RTPROT_STATIC,
    }
    if route.gateway:
        kwargs["gateway"] = route.gateway
    if route.dev:
        kwargs["oif"] = ifindex[route.dev] if route.dev in ifindex else int(route.dev)
    if route.onlink:
        kwargs["flags"] = RTNH_F_ONLINK
    if route.src:
        kwargs["prefsrc"] = route.src
    return kwargs


def apply_steps(ipr, steps: Sequence[Step], links: Dict[int, str]) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    ifindex = {name: idx for idx, name in links.items()}
    for step in steps:
        try:
            if step.kind == "rule-add":
                ipr.rule("add", **_rule_kwargs(step.obj))
            elif step.kind == "rule-del":
                ipr.rule("del", **_rule_kwargs(step.obj))
            elif step.kind == "route-replace":
                ipr.route("replace", **_route_kwargs(step.obj, ifindex))
            elif step.kind == "route-del":
                kwargs = _route_kwargs(step.obj, ifindex)
                kwargs.pop("proto")
                ipr.route("del", **kwargs)
        except NetlinkError as exc:
            if step.kind.endswith("-del") and exc.code in (2, 3):
                continue  # already gone (removed with its device, or by the kernel): the goal holds
            hint = {
                101: " (gateway unreachable: check dev/gateway or set onlink)",
                19: " (no such device)",
                17: " (already exists)",
                2: " (not found: changed meanwhile?)",
            }
            raise RoutingError(
                f"netlink refused '{step.text()}': {exc.args[-1] if exc.args else exc}"
                f"{hint.get(exc.code, '')}; earlier steps of this run were applied, rerun after fixing"
            ) from None
