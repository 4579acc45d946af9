"""ztmesh_routing without root: validation, netlink message parsing and the ordered plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_routing as rt

REPO = Path(__file__).resolve().parents[2]

NODE_RULES = [
    {"priority": 100, "fwmark": "0x200", "fwmask": "0x200", "goto": 32766},
    {"priority": 101, "fwmark": "0x100", "fwmask": "0x100", "table": 101},
    {"priority": 102, "fwmark": 0x40, "fwmask": 0x40, "table": "102"},
    {"priority": 103, "table": 100},
]


def spec(**kw) -> rt.RoutingSpec:
    params = {"rules": [], "routes": [], "rule_priorities": None, "tables": None, "local_rule_priority": None}
    params.update(kw)
    return rt.spec_from_params(params)


def test_node_rules_parse_and_print_like_ip_rule() -> None:
    s = spec(rules=NODE_RULES)
    assert [r.text() for r in s.rules] == [
        "100: from all fwmark 0x200/0x200 goto 32766",
        "101: from all fwmark 0x100/0x100 lookup 101",
        "102: from all fwmark 0x40/0x40 lookup 102",
        "103: from all lookup 100",
    ]
    assert s.priority_range == (100, 103)


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"priority": 100, "fwmark": "0x200", "table": 1}], "fwmark and fwmask go together"),
        ([{"priority": 100, "fwmask": "0x200", "table": 1}], "fwmark and fwmask go together"),
        ([{"priority": 100}], "exactly one of table"),
        ([{"priority": 100, "table": 1, "goto": 200}], "exactly one of table"),
        ([{"priority": 100, "goto": 50}], "later"),
        ([{"priority": 0, "table": 1}], "default rules"),
        ([{"priority": 100, "table": "mainn"}], "not a number or one of main"),
        ([{"priority": 100, "table": 1, "from": "10.0.0.1/8"}], "host bits set; write 10.0.0.0/8"),
        ([{"priority": 100, "table": 1, "to": "fd00::/8"}], "IPv4 only"),
        ([{"priority": 100, "table": 1, "iif": "x" * 16}], "interface name"),
        ([{"priority": 100, "fwmark": "zz", "fwmask": 1, "table": 1}], "not an integer"),
        ([{"priority": 100, "table": 1}, {"priority": 100, "table": 1}], "listed twice"),
    ],
)
def test_rule_validation(rules, message) -> None:
    with pytest.raises(rt.RoutingError, match=message):
        spec(rules=rules)


def test_priority_range_validation() -> None:
    with pytest.raises(rt.RoutingError, match="outside rule_priorities"):
        spec(rules=[{"priority": 300, "table": 1}], rule_priorities=[100, 199])
    with pytest.raises(rt.RoutingError, match="covers the kernel default rule"):
        spec(rule_priorities=[100, 40000])
    with pytest.raises(rt.RoutingError, match="first must not be above last"):
        spec(rule_priorities=[200, 100])
    with pytest.raises(rt.RoutingError, match="local_rule_priority"):
        spec(local_rule_priority=32766)


@pytest.mark.parametrize(
    "routes, message",
    [
        ([{"table": 100}], "needs dst"),
        ([{"table": 100, "dst": "default"}], "give dev"),
        (
            [{"table": 100, "dst": "default", "type": "local", "gateway": "10.0.0.1", "dev": "lo"}],
            "no gateway",
        ),
        (
            [{"table": 100, "dst": "default", "gateway": "10.0.0.1", "dev": "x", "scope": "link"}],
            "scope global",
        ),
        ([{"table": 100, "dst": "default", "gateway": "10.0.0.1", "onlink": True}], "onlink needs"),
        ([{"table": 100, "dst": "10.0.0.1/24", "dev": "x"}], "host bits"),
        (
            [{"table": 100, "dst": "default", "dev": "x"}, {"table": 100, "dst": "0.0.0.0/0", "dev": "y"}],
            "share table, dst and metric",
        ),
    ],
)
def test_route_validation(routes, message) -> None:
    with pytest.raises(rt.RoutingError, match=message):
        spec(routes=routes)


def test_tables_default_to_named_tables_but_never_main() -> None:
    s = spec(
        routes=[
            {"table": "main", "dst": "default", "gateway": "10.0.0.1", "dev": "eth0"},
            {"table": 101, "dst": "default", "gateway": "10.0.0.1", "dev": "eth0"},
        ]
    )
    assert s.tables == [101]
    with pytest.raises(rt.RoutingError, match="cannot be owned"):
        spec(tables=["main"])


def test_route_scopes_default_like_iproute2() -> None:
    s = spec(
        routes=[
            {"table": 100, "dst": "default", "type": "local", "dev": "lo"},
            {"table": 101, "dst": "10.0.0.2/32", "dev": "veth"},
            {"table": 101, "dst": "default", "gateway": "10.0.0.2", "dev": "veth"},
        ]
    )
    assert [r.scope for r in s.routes] == [254, 253, 0]
    assert [r.text() for r in s.routes] == [
        "local 0.0.0.0/0 dev lo table 100",
        "10.0.0.2/32 dev veth table 101",
        "default via 10.0.0.2 dev veth table 101",
    ]


def _rule_msg(priority, table, action=1, **attrs):
    base = {
        "FRA_PRIORITY": priority,
        "FRA_TABLE": table,
        "FRA_SUPPRESS_PREFIXLEN": 0xFFFFFFFF,
        "FRA_PROTOCOL": 2,
    }
    base.update(attrs)
    if priority == 0:
        base.pop("FRA_PRIORITY")
    return {
        "action": action,
        "table": table if table < 256 else 252,
        "src_len": 0,
        "dst_len": 0,
        "tos": 0,
        "flags": 0,
        "attrs": list(base.items()),
    }


def test_rule_from_msg_matches_desired_rule_exactly() -> None:
    msg = _rule_msg(100, 0, action=2, FRA_FWMARK=0x200, FRA_FWMASK=0x200, FRA_GOTO=32766)
    assert rt.rule_from_msg(msg) == spec(rules=NODE_RULES[:1]).rules[0]
    local = rt.rule_from_msg(_rule_msg(0, 255))
    assert rt.is_local_rule(local) and local.priority == 0
    # An attribute ztmesh does not manage makes the rule differ from every desired rule.
    odd = rt.rule_from_msg(_rule_msg(103, 100, FRA_UID_RANGE={"start": 0, "end": 10}))
    assert odd != spec(rules=NODE_RULES[3:]).rules[0]


def test_route_from_msg() -> None:
    msg = {
        "dst_len": 0,
        "tos": 0,
        "table": 102,
        "scope": 0,
        "type": 1,
        "flags": 4,
        "attrs": [("RTA_TABLE", 102), ("RTA_GATEWAY", "10.99.0.2"), ("RTA_OIF", 3)],
    }
    route = rt.route_from_msg(msg, {3: "ztproxy0"})
    want = spec(
        routes=[{"table": 102, "dst": "default", "gateway": "10.99.0.2", "dev": "ztproxy0", "onlink": True}]
    ).routes[0]
    assert route == want


def _kernel_default_rules():
    return [
        rt.rule_from_msg(_rule_msg(0, 255)),
        rt.rule_from_msg(_rule_msg(32766, 254)),
        rt.rule_from_msg(_rule_msg(32767, 253)),
    ]


def test_local_rule_is_added_at_its_new_priority_before_priority_0_is_deleted() -> None:
    s = spec(rules=NODE_RULES, rule_priorities=[100, 199], local_rule_priority=200)
    plan = rt.plan_routing(s, _kernel_default_rules(), [], present=True)
    texts = [step.text() for step in plan.steps]
    assert texts[:2] == ["rule-add 200: from all lookup local", "rule-del 0: from all lookup local"]
    assert texts[2:] == [f"rule-add {r.text()}" for r in s.rules]
    # Undo: the priority-0 rule comes back before the moved one goes.
    moved = [r for r in _kernel_default_rules() if r.priority != 0] + [rt.Rule(priority=200, table=255)]
    moved += s.rules
    undo = rt.plan_routing(s, moved, [], present=False)
    texts = [step.text() for step in undo.steps]
    assert texts[:2] == ["rule-add 0: from all lookup local", "rule-del 200: from all lookup local"]
    assert sorted(texts[2:]) == sorted(f"rule-del {r.text()}" for r in s.rules)


def test_plan_sweeps_foreign_rules_in_the_owned_range_only() -> None:
    s = spec(rules=NODE_RULES)
    current = (
        _kernel_default_rules() + s.rules + [rt.Rule(priority=102, table=7), rt.Rule(priority=500, table=9)]
    )
    plan = rt.plan_routing(s, current, [], present=True)
    assert [step.text() for step in plan.steps] == ["rule-del 102: from all lookup 7"]


def test_plan_routes_link_routes_first_replace_in_place_and_sweep_owned_tables() -> None:
    s = spec(
        routes=[
            {"table": 101, "dst": "default", "gateway": "192.168.127.2", "dev": "istioout"},
            {"table": 101, "dst": "10.99.0.2/32", "dev": "ztproxy0"},
        ]
    )
    current = [
        rt.Route(table=101, dst="0.0.0.0/0", gateway="192.168.127.9", dev="istioout"),  # wrong gateway
        rt.Route(table=101, dst="10.5.0.0/24", dev="x", scope=253),  # stray route in an owned table
        rt.Route(table=254, dst="10.6.0.0/24", dev="x", scope=253),  # main: not owned, untouched
    ]
    plan = rt.plan_routing(s, [], current, present=True)
    assert [step.text() for step in plan.steps] == [
        "route-replace 10.99.0.2/32 dev ztproxy0 table 101",
        "route-replace default via 192.168.127.2 dev istioout table 101",
        "route-del 10.5.0.0/24 dev x table 101",
    ]
    assert rt.plan_routing(s, [], list(s.routes), present=True).steps == []
