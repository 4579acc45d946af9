"""ztmesh_routing against the real kernel (pyroute2/netlink) in throwaway namespaces."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ansible_module import run_module  # noqa: E402

pytestmark = pytest.mark.timeout(300)

PROXY = "10.99.0.2"
RULES = [
    {"priority": 100, "fwmark": "0x200", "fwmask": "0x200", "goto": 32766},
    {"priority": 101, "fwmark": "0x100", "fwmask": "0x100", "table": 101},
    {"priority": 102, "fwmark": "0x040", "fwmask": "0x040", "table": 102},
    {"priority": 103, "table": 100},
]
ROUTES = [
    {"table": 101, "dst": f"{PROXY}/32", "dev": "ztproxy0", "scope": "link"},
    {"table": 101, "dst": "default", "gateway": "192.168.127.2", "dev": "istioout"},
    {"table": 102, "dst": f"{PROXY}/32", "dev": "ztproxy0", "scope": "link"},
    {"table": 102, "dst": "default", "gateway": PROXY, "dev": "ztproxy0", "onlink": True},
    {"table": 100, "dst": f"{PROXY}/32", "dev": "ztproxy0", "scope": "link"},
    {"table": 100, "dst": "10.20.0.5/32", "gateway": "192.168.127.2", "dev": "istioout"},
]


def node(sh, ns: str) -> None:
    """The node-side links of docs/dataplane.md, "Objects" (veth to the proxy, a stand-in for istioout)."""
    for cmd in (
        "ip link add ztproxy0 type veth peer name zp-peer",
        "ip link add istioout type veth peer name io-peer",
        "ip addr add 10.99.0.1/30 dev ztproxy0",
        "ip addr add 192.168.127.1/30 dev istioout",
        "ip link set ztproxy0 up",
        "ip link set zp-peer up",
        "ip link set istioout up",
        "ip link set io-peer up",
        # Foreign state that must survive: a rule outside the owned range, a route in main.
        "ip rule add priority 500 fwmark 0x7/0x7 lookup 77",
        "ip route add 10.77.0.0/16 via 10.99.0.2 dev ztproxy0",
    ):
        sh(*cmd.split(), netns=ns)


def snapshot(sh, ns: str) -> str:
    rules = sh("ip", "rule", netns=ns).stdout
    routes = sh("ip", "-4", "route", "show", "table", "all", netns=ns).stdout
    return rules + routes


_ROUNDTRIP = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
cli = socket.create_connection(srv.getsockname(), timeout=3)
conn, _ = srv.accept()
cli.sendall(b"ping")
assert conn.recv(4) == b"ping"
"""


def local_tcp_roundtrip(sh, ns: str, address: str) -> None:
    """A TCP connection to one of the namespace's own addresses (delivered through the local table)."""
    sh(sys.executable, "-c", _ROUNDTRIP, address, netns=ns)


def routing(ns: str, check: bool = False, diff: bool = False, **args) -> dict:
    return run_module("ztmesh_routing", dict(args, netns=ns), check=check, diff=diff)


def test_design_rules_and_routes_lifecycle(netns, sh) -> None:
    node(sh, netns)
    pristine = snapshot(sh, netns)
    args = {"rules": RULES, "routes": ROUTES}

    result = routing(netns, check=True, diff=True, **args)
    assert result["changed"] is True, result
    assert "100: from all fwmark 0x200/0x200 goto 32766" in result["diff"]["after"]
    assert snapshot(sh, netns) == pristine

    result = routing(netns, **args)
    assert result["changed"] is True, result
    rules = sh("ip", "rule", netns=netns).stdout
    assert "100:\tfrom all fwmark 0x200/0x200 goto 32766" in rules
    assert "102:\tfrom all fwmark 0x40/0x40 lookup 102" in rules
    assert "103:\tfrom all lookup 100" in rules
    table102 = sh("ip", "route", "show", "table", "102", netns=netns).stdout
    assert f"default via {PROXY} dev ztproxy0 proto static onlink" in table102
    created = snapshot(sh, netns)

    assert routing(netns, **args)["changed"] is False

    # Drift: a route and a rule deleted by hand, a stray route and rule added in owned space.
    sh("ip", "route", "del", "default", "table", "101", netns=netns)
    sh("ip", "rule", "del", "priority", "101", netns=netns)
    sh("ip", "route", "add", "10.55.0.0/16", "dev", "ztproxy0", "table", "100", netns=netns)
    sh("ip", "rule", "add", "priority", "102", "lookup", "55", netns=netns)
    drifted = snapshot(sh, netns)
    assert routing(netns, check=True, **args)["changed"] is True
    assert snapshot(sh, netns) == drifted
    result = routing(netns, diff=True, **args)
    assert result["changed"] is True
    assert "10.55.0.0/16 dev ztproxy0 table 100" in result["diff"]["before"]
    assert snapshot(sh, netns) == created

    # A gateway change is replaced in place (one route per key, no gap).
    changed = [dict(r) for r in ROUTES]
    changed[5].update(gateway=PROXY, dev="ztproxy0")
    assert routing(netns, rules=RULES, routes=changed)["changed"] is True
    table100 = sh("ip", "route", "show", "table", "100", netns=netns).stdout
    assert f"10.20.0.5 via {PROXY} dev ztproxy0" in table100 and "istioout" not in table100

    result = routing(netns, state="absent", **args)
    assert result["changed"] is True, result
    assert snapshot(sh, netns) == pristine
    assert routing(netns, state="absent", **args)["changed"] is False


def test_proxy_namespace_local_route(netns, sh) -> None:
    args = {
        "rules": [
            {"priority": 20000, "fwmark": "0x400", "fwmask": "0xfff", "table": 100},
            {"priority": 20003, "fwmark": "0x4d3", "fwmask": "0xfff", "table": 100},
        ],
        "routes": [{"table": 100, "dst": "default", "type": "local", "dev": "lo"}],
    }
    result = routing(netns, **args)
    assert result["changed"] is True and result["routes"] == ["local 0.0.0.0/0 dev lo table 100"], result
    assert (
        "local default dev lo proto static scope host"
        in sh("ip", "route", "show", "table", "100", netns=netns).stdout
    )
    assert "20003:\tfrom all fwmark 0x4d3/0xfff lookup 100" in sh("ip", "rule", netns=netns).stdout
    assert routing(netns, **args)["changed"] is False


def test_rule_matching_a_clear_mark_bit_is_idempotent(netns, sh) -> None:
    """``fwmark 0/0x200`` (mark bit clear): the kernel reports such a rule with a mask and no mark."""
    args = {"rules": [{"priority": 103, "fwmark": "0x0", "fwmask": "0x200", "table": 100}]}
    assert routing(netns, **args)["changed"] is True
    assert "103:\tfrom all fwmark 0/0x200 lookup 100" in sh("ip", "rule", netns=netns).stdout
    assert routing(netns, **args)["changed"] is False
    assert routing(netns, state="absent", **args)["changed"] is True
    assert "103:" not in sh("ip", "rule", netns=netns).stdout


def test_local_rule_moves_and_comes_back(netns, sh) -> None:
    node(sh, netns)
    pristine = snapshot(sh, netns)
    args = {"rules": RULES[:1], "rule_priorities": [100, 199], "local_rule_priority": 200}
    assert routing(netns, **args)["changed"] is True
    rules = sh("ip", "rule", netns=netns).stdout.splitlines()
    assert rules[0] == "100:\tfrom all fwmark 0x200/0x200 goto 32766"
    assert "200:\tfrom all lookup local" in rules and not rules[0].startswith("0:")
    # Local delivery still works through the moved rule.
    local_tcp_roundtrip(sh, netns, "10.99.0.1")
    assert routing(netns, **args)["changed"] is False
    assert routing(netns, state="absent", **args)["changed"] is True
    assert snapshot(sh, netns) == pristine
    local_tcp_roundtrip(sh, netns, "10.99.0.1")


def test_less_specific_stray_rule_at_a_wanted_priority(netns, sh) -> None:
    # The kernel deletes the first rule matching the attributes given (absent ones are wildcards), so
    # deleting "103: lookup 100" first hits the wanted "103: fwmark 0x5/0x5 lookup 100" listed above it.
    sh("ip", "rule", "add", "priority", "103", "fwmark", "0x5/0x5", "lookup", "100", netns=netns)
    sh("ip", "rule", "add", "priority", "103", "lookup", "100", netns=netns)
    wanted = [{"priority": 103, "fwmark": 5, "fwmask": 5, "table": 100}]
    result = routing(netns, rules=wanted)
    assert result["changed"] is True and result["rules"] == ["103: from all fwmark 0x5/0x5 lookup 100"], (
        result
    )
    rules = [line for line in sh("ip", "rule", netns=netns).stdout.splitlines() if line.startswith("103:")]
    assert rules == ["103:\tfrom all fwmark 0x5/0x5 lookup 100"]
    assert routing(netns, rules=wanted)["changed"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (
            {
                "routes": [{"table": 101, "dst": "default", "gateway": "10.99.0.2", "dev": "nosuchdev0"}],
                "rules": RULES,
            },
            "device 'nosuchdev0' does not exist",
        ),
        (
            {
                "routes": [{"table": 101, "dst": "default", "gateway": "10.50.0.1", "dev": "ztproxy0"}],
                "rules": RULES,
            },
            "gateway 10.50.0.1 is not directly reachable through ztproxy0",
        ),
        (
            {"rules": RULES + [{"priority": 104, "fwmark": "0x1", "table": 5}]},
            "fwmark and fwmask go together",
        ),
        (
            {"routes": [{"table": 101, "dst": "default", "gateway": "192.168.127.3", "dev": "istioout"}]},
            "broadcast address of 192.168.127.0/30",
        ),
        (
            {"routes": [{"table": 101, "dst": "default", "gateway": "10.99.0.1", "dev": "ztproxy0"}]},
            "address of this host",
        ),
        ({"rules": RULES, "tables": ["main"]}, "cannot be owned"),
    ],
)
def test_bad_input_changes_nothing(netns, sh, args, message) -> None:
    node(sh, netns)
    before = snapshot(sh, netns)
    result = routing(netns, **args)
    assert result.get("failed") and message in result["msg"], result
    assert snapshot(sh, netns) == before
