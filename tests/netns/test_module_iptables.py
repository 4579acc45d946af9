"""ztmesh_iptables against real iptables (legacy and nft) in throwaway namespaces.

The rule sets are the node's of docs/dataplane.md, "Rule sets" (node mangle and nat chains: MARK,
CONNMARK, set match, comment, owner; the proxy namespace's TPROXY capture). Foreign chains and rules,
including a foreign rule at the top of PREROUTING, must come out byte-for-byte identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ansible_module import run_module  # noqa: E402

pytestmark = pytest.mark.timeout(300)

PROXY = "10.99.0.2"
HOST = "10.99.0.1"
MANGLE = [
    {
        "name": "ztunnel-PREROUTING",
        "jump_from": "PREROUTING",
        "rules": [
            "-i istioin -j MARK --set-mark 0x200/0x200",
            "-i istioin -j RETURN",
            "-i istioout -j MARK --set-mark 0x200/0x200",
            "-i istioout -j RETURN",
            "-p udp --dport 6081 -j RETURN",
            "-m connmark --mark 0x220/0x220 -j MARK --set-mark 0x200/0x200",
            "-m mark --mark 0x200/0x200 -j RETURN",
            "! -i ztproxy0 -m connmark --mark 0x210/0x210 -j MARK --set-mark 0x40/0x40",
            "-m mark --mark 0x40/0x40 -j RETURN",
            f"-i ztproxy0 ! -s {PROXY} -j MARK --set-mark 0x210/0x210",
            "-m mark --mark 0x200/0x200 -j RETURN",
            "-i ztproxy0 -j MARK --set-mark 0x220/0x220",
            "-p udp -j MARK --set-mark 0x220/0x220",
            "-m mark --mark 0x200/0x200 -j RETURN",
            "-p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-mark 0x100/0x100",
        ],
    },
    {
        "name": "ztunnel-FORWARD",
        "jump_from": "FORWARD",
        "rules": [
            "-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
            "-m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210",
        ],
    },
    {
        "name": "ztunnel-INPUT",
        "jump_from": "INPUT",
        "rules": [
            "-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
            "-m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210",
        ],
    },
    {
        "name": "ztunnel-OUTPUT",
        "jump_from": "OUTPUT",
        "rules": [
            f"--source {HOST} -j MARK --set-mark 0x220/0xffffffff",
            "-p tcp -m owner ! --uid-owner 0 -m comment --comment 'host workload \"outbound\"' "
            "-j MARK --set-mark 0x100/0x100",
        ],
    },
    {"name": "ztunnel-POSTROUTING", "jump_from": "POSTROUTING", "rules": []},
]
NAT = [
    {
        "name": "ztunnel-PREROUTING",
        "jump_from": "PREROUTING",
        "rules": ["-m mark --mark 0x100/0x100 -j ACCEPT"],
    },
    {
        "name": "ztunnel-POSTROUTING",
        "jump_from": "POSTROUTING",
        "rules": [
            "-m mark --mark 0x100/0x100 -j ACCEPT",
            f"-s {PROXY}/32 -p tcp --dport 15008 -j SNAT --to-source {HOST}",
        ],
    },
]
PROXY_MANGLE = [
    {
        "name": "ztunnel-PREROUTING",
        "jump_from": "PREROUTING",
        "rules": [
            "-i pistioin -p tcp --dport 15008 -j TPROXY --on-port 15008 --tproxy-mark 0x400/0xfff",
            "-i pistioout -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x400/0xfff",
            "-i pistioin -p tcp -j TPROXY --on-port 15006 --tproxy-mark 0x400/0xfff",
            f"-i eth0 -p tcp ! -d {PROXY} -j MARK --set-mark 0x4d3/0xfff",
        ],
    },
]
FOREIGN = [
    "-t mangle -N FOREIGN",
    "-t mangle -A FOREIGN -p tcp --dport 22 -j ACCEPT",
    "-t mangle -A PREROUTING -j FOREIGN",
    "-t mangle -I PREROUTING 1 -p icmp -m comment --comment foreign-top -j ACCEPT",
    "-t mangle -A OUTPUT -o lo -j ACCEPT",
    "-t nat -I PREROUTING 1 -p tcp --dport 2222 -j REDIRECT --to-ports 22",
    "-t nat -A POSTROUTING -o eth9 -j MASQUERADE",
    "-t filter -A INPUT -p tcp --dport 22 -j ACCEPT",
]


def save(sh, ns: str, backend: str) -> str:
    out = sh(f"iptables-{backend}-save", netns=ns).stdout
    return "".join(line + "\n" for line in out.splitlines() if not line.startswith("#"))


def prepare(sh, ns: str, backend: str) -> None:
    sh("ipset", "create", "ztunnel-pods-ips", "hash:ip", netns=ns)
    for rule in FOREIGN:
        sh(f"iptables-{backend}", *rule.split(), netns=ns)


def apply(ns: str, table: str, chains, backend: str, **kw) -> dict:
    args = {"netns": ns, "table": table, "chains": chains, "backend": backend}
    args.update(kw.pop("extra", {}))
    return run_module("ztmesh_iptables", args, **kw)


def foreign_lines(dump: str) -> list:
    return [line for line in dump.splitlines() if "ztunnel" not in line and "ztmesh" not in line]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_design_chains_lifecycle(netns, sh, backend) -> None:
    prepare(sh, netns, backend)
    pristine = save(sh, netns, backend)

    # Check mode reports the change and writes nothing.
    result = apply(netns, "mangle", MANGLE, backend, check=True, diff=True)
    assert result["changed"] is True, result
    assert "-j ztunnel-PREROUTING" in result["diff"]["after"]
    assert save(sh, netns, backend) == pristine

    for table, chains in (("mangle", MANGLE), ("nat", NAT)):
        result = apply(netns, table, chains, backend, diff=True)
        assert result["changed"] is True, result
        assert result["backend"]["backend"] == backend
    created = save(sh, netns, backend)
    assert foreign_lines(created) == foreign_lines(pristine)
    for table in ("mangle", "nat"):
        rules = sh(f"iptables-{backend}", "-t", table, "-S", "PREROUTING", netns=netns).stdout.splitlines()
        assert rules[1] == (
            '-A PREROUTING -m comment --comment "ztmesh: jump to ztunnel-PREROUTING" -j ztunnel-PREROUTING'
        ), rules
    assert "--match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100" in created
    assert 'host workload \\"outbound\\"' in created

    # Second run: nothing to do for the full rule sets.
    for table, chains in (("mangle", MANGLE), ("nat", NAT)):
        result = apply(netns, table, chains, backend)
        assert result["changed"] is False, result
    assert save(sh, netns, backend) == created

    # Drift: one rule deleted by hand is restored, exactly.
    sh(f"iptables-{backend}", "-t", "mangle", "-D", "ztunnel-PREROUTING", "5", netns=netns)
    result = apply(netns, "mangle", MANGLE, backend, diff=True)
    assert result["changed"] is True
    assert "--dport 6081" in result["diff"]["after"] and "--dport 6081" not in result["diff"]["before"]
    assert save(sh, netns, backend) == created

    # A foreign rule inserted above our jump: ours goes back to the top, the foreign rule stays.
    sh(f"iptables-{backend}", "-t", "nat", "-I", "PREROUTING", "1", "-p", "udp", "-j", "ACCEPT", netns=netns)
    assert apply(netns, "nat", NAT, backend)["changed"] is True
    rules = sh(f"iptables-{backend}", "-t", "nat", "-S", "PREROUTING", netns=netns).stdout.splitlines()
    assert "ztmesh: jump to ztunnel-PREROUTING" in rules[1] and rules[2] == "-A PREROUTING -p udp -j ACCEPT"
    sh(f"iptables-{backend}", "-t", "nat", "-D", "PREROUTING", "-p", "udp", "-j", "ACCEPT", netns=netns)
    assert save(sh, netns, backend) == created

    # Absent: nothing of ours left, everything else byte-for-byte as before.
    for table, chains in (("mangle", MANGLE), ("nat", NAT)):
        result = apply(netns, table, chains, backend, extra={"state": "absent"})
        assert result["changed"] is True, result
    assert save(sh, netns, backend) == pristine
    for table, chains in (("mangle", MANGLE), ("nat", NAT)):
        assert apply(netns, table, chains, backend, extra={"state": "absent"})["changed"] is False


def test_proxy_namespace_tproxy_rules(netns, sh) -> None:
    backend = "nft"
    result = apply(netns, "mangle", PROXY_MANGLE, backend)
    assert result["changed"] is True, result
    dump = save(sh, netns, backend)
    assert (
        "-i pistioin -p tcp -m comment --comment ztmesh -m tcp --dport 15008 -j TPROXY --on-port 15008 "
        "--on-ip 0.0.0.0 --tproxy-mark 0x400/0xfff"
    ) in dump
    assert result["chains"][0]["rules"][0].startswith("-i pistioin -p tcp -m comment --comment ztmesh")
    assert apply(netns, "mangle", PROXY_MANGLE, backend)["changed"] is False
    assert save(sh, netns, backend) == dump


def test_auto_backend_follows_the_host(netns, sh) -> None:
    # Rules already live in legacy: auto must write there too, never into nft.
    sh(
        "iptables-legacy",
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "ACCEPT",
        netns=netns,
    )
    result = run_module("ztmesh_iptables", {"netns": netns, "table": "nat", "chains": NAT[:1]})
    assert result["changed"] is True and result["backend"]["backend"] == "legacy", result
    assert "ztunnel-PREROUTING" in save(sh, netns, "legacy")
    assert "ztunnel-PREROUTING" not in save(sh, netns, "nft")
    # Asking for the other backend now would split ztmesh across both: refused, nothing written.
    result = apply(netns, "nat", NAT[:1], "nft")
    assert result.get("failed") and "never mixes backends" in result["msg"], result
    assert "ztunnel-PREROUTING" not in save(sh, netns, "nft")


def test_invalid_rule_is_reported_and_changes_nothing(netns, sh) -> None:
    backend = "nft"
    prepare(sh, netns, backend)
    assert apply(netns, "nat", NAT, backend)["changed"] is True
    before = save(sh, netns, backend)
    bad = [
        NAT[0],
        {
            "name": "ztunnel-POSTROUTING",
            "jump_from": "POSTROUTING",
            "rules": ["-j ACCEPT", "-m mark --mark 0x100/0x100 -j MARK --set-mork 0x1/0x1"],
        },
    ]
    result = apply(netns, "nat", bad, backend)
    assert result.get("failed"), result
    assert "chain ztunnel-POSTROUTING rule 2" in result["msg"] and "--set-mork" in result["msg"], result[
        "msg"
    ]
    assert "nothing was changed" in result["msg"]
    assert save(sh, netns, backend) == before
    # A rule matching a set that does not exist: told to create the set first.
    result = apply(netns, "nat", [{"name": "x", "rules": ["-m set --match-set nope src -j ACCEPT"]}], backend)
    assert result.get("failed") and "ipset 'nope'" in result["msg"] and "ztmesh_ipset" in result["msg"]
    assert save(sh, netns, backend) == before


def test_absent_refuses_while_a_foreign_rule_references_the_chain(netns, sh) -> None:
    backend = "nft"
    assert apply(netns, "nat", NAT, backend)["changed"] is True
    sh("iptables-nft", "-t", "nat", "-A", "OUTPUT", "-j", "ztunnel-PREROUTING", netns=netns)
    before = save(sh, netns, backend)
    result = apply(netns, "nat", NAT, backend, extra={"state": "absent"})
    assert result.get("failed") and "-A OUTPUT -j ztunnel-PREROUTING" in result["msg"], result
    assert save(sh, netns, backend) == before


def test_ip6tables(netns, sh) -> None:
    chains = [
        {
            "name": "ztunnel-PREROUTING",
            "jump_from": "PREROUTING",
            "rules": ["-s fd00::1 -p tcp --dport 80 -j MARK --set-mark 0x1/0x1"],
        }
    ]
    args = {"netns": netns, "table": "mangle", "ip_version": 6, "chains": chains, "backend": "nft"}
    ip4_before = save(sh, netns, "nft")
    result = run_module("ztmesh_iptables", args)
    assert result["changed"] is True, result
    assert result["chains"][0]["rules"] == [
        "-s fd00::1/128 -p tcp -m comment --comment ztmesh -m tcp --dport 80 -j MARK --set-xmark 0x1/0x1"
    ]
    assert run_module("ztmesh_iptables", args)["changed"] is False
    assert save(sh, netns, "nft") == ip4_before  # IPv4 untouched
    assert run_module("ztmesh_iptables", dict(args, state="absent"))["changed"] is True
    assert "ztunnel" not in sh("ip6tables-nft-save", netns=netns).stdout


def test_remove_empty_table_deletes_only_a_table_left_empty(netns, sh) -> None:
    """What ztmesh created goes, tables included (uninstall leaves a node as it was); a table that still
    holds something of someone else stays, with that content."""
    assert save(sh, netns, "nft") == ""  # a fresh namespace has no table at all
    sh("iptables-nft", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
       netns=netns)
    filter_chains = [{"name": "ztunnel-INPUT", "jump_from": "INPUT", "rules": ["-j RETURN"]}]
    for table, chains in (("mangle", MANGLE[1:]), ("nat", NAT), ("filter", filter_chains)):
        assert apply(netns, table, chains, "nft")["changed"] is True
    absent = {"state": "absent", "remove_empty_table": True}

    # Check mode: reported, nothing deleted.
    before = save(sh, netns, "nft")
    result = apply(netns, "nat", NAT, "nft", check=True, diff=True, extra=absent)
    assert result["changed"] is True and result["table_removed"] is True, result
    assert result["diff"]["before"].startswith("*nat (empty: deleted)")
    assert save(sh, netns, "nft") == before

    for table, chains in (("mangle", MANGLE[1:]), ("nat", NAT)):
        result = apply(netns, table, chains, "nft", extra=absent)
        assert result["changed"] is True and result["table_removed"] is True, result
    result = apply(netns, "filter", filter_chains, "nft", extra=absent)
    assert result["changed"] is True and result["table_removed"] is False, result
    assert save(sh, netns, "nft") == (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    )
    tables = sh("nft", "list", "tables", netns=netns).stdout.split("\n")
    assert "table ip mangle" not in tables and "table ip nat" not in tables, tables

    # Second run: nothing left to do.
    for table, chains in (("mangle", MANGLE[1:]), ("nat", NAT), ("filter", filter_chains)):
        result = apply(netns, table, chains, "nft", extra=absent)
        assert result["changed"] is False and result["table_removed"] is False, result


def test_remove_empty_table_with_legacy_warns_and_keeps_the_table(netns, sh) -> None:
    assert apply(netns, "nat", NAT, "legacy")["changed"] is True
    result = apply(netns, "nat", NAT, "legacy", extra={"state": "absent", "remove_empty_table": True})
    assert result["changed"] is True and result["table_removed"] is False, result
    assert any("legacy backend cannot delete" in w for w in result.get("warnings", [])), result
    assert "*nat" in save(sh, netns, "legacy") and "ztunnel" not in save(sh, netns, "legacy")


def test_remove_empty_table_is_refused_with_state_present(netns, sh) -> None:
    result = apply(netns, "nat", NAT, "nft", extra={"remove_empty_table": True})
    assert result.get("failed") and "state=absent only" in result["msg"], result
    assert save(sh, netns, "nft") == ""
