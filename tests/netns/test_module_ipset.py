"""ztmesh_ipset against the real ipset tool and kernel, in throwaway namespaces."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ansible_module import run_module  # noqa: E402

pytestmark = pytest.mark.timeout(300)
NAME = "ztunnel-pods-ips"


def ipset_save(sh, ns: str) -> str:
    """Sets and members, sorted, without the random hash seed (initval)."""
    out = sh("ipset", "save", netns=ns).stdout
    return "\n".join(sorted(re.sub(r" initval 0x[0-9a-f]+", "", line) for line in out.splitlines()))


def members(sh, ns: str, name: str = NAME) -> set:
    out = sh("ipset", "save", name, netns=ns).stdout
    return {line.split()[2] for line in out.splitlines() if line.startswith("add ")}


def references(sh, ns: str, name: str = NAME) -> int:
    out = sh("ipset", "list", "-t", name, netns=ns).stdout
    return int(re.search(r"References: (\d+)", out).group(1))


def ipset(ns: str, check: bool = False, diff: bool = False, **args) -> dict:
    args.setdefault("name", NAME)
    return run_module("ztmesh_ipset", dict(args, netns=ns), check=check, diff=diff)


def test_exact_lifecycle_with_drift_and_check_mode(netns, sh) -> None:
    sh("ipset", "create", "foreign", "hash:net", netns=netns)
    sh("ipset", "add", "foreign", "10.9.0.0/16", netns=netns)
    pristine = ipset_save(sh, netns)

    result = ipset(netns, check=True, diff=True, members=["10.0.0.1", "10.0.0.2"])
    assert result["changed"] is True and result["added"] == ["10.0.0.1", "10.0.0.2"], result
    assert ipset_save(sh, netns) == pristine

    result = ipset(netns, diff=True, members=["10.0.0.2", "10.0.0.1"])
    assert result["changed"] is True and result["members"] == ["10.0.0.1", "10.0.0.2"], result
    assert result["diff"]["before"] == {} and result["diff"]["after"]["members"] == ["10.0.0.1", "10.0.0.2"]
    assert members(sh, netns) == {"10.0.0.1", "10.0.0.2"}
    created = ipset_save(sh, netns)

    result = ipset(netns, members=["10.0.0.1", "10.0.0.2"])
    assert result["changed"] is False and result["added"] == [] and result["removed"] == []

    # Drift: a member removed and a stray one added by hand; exactly those are repaired.
    sh("ipset", "del", NAME, "10.0.0.1", netns=netns)
    sh("ipset", "add", NAME, "10.0.0.77", netns=netns)
    drifted = ipset_save(sh, netns)
    result = ipset(netns, check=True, members=["10.0.0.1", "10.0.0.2"])
    assert result["changed"] is True and ipset_save(sh, netns) == drifted
    result = ipset(netns, members=["10.0.0.1", "10.0.0.2"])
    assert (
        result["changed"] is True and result["added"] == ["10.0.0.1"] and result["removed"] == ["10.0.0.77"]
    )
    assert ipset_save(sh, netns) == created
    assert "foreign" in sh("ipset", "list", "-n", netns=netns).stdout

    assert ipset(netns, state="absent")["changed"] is True
    assert ipset_save(sh, netns) == pristine
    assert ipset(netns, state="absent")["changed"] is False


def test_swap_keeps_iptables_references_working(netns, sh) -> None:
    assert ipset(netns, members=["10.0.0.1"])["changed"] is True
    sh(
        "iptables-nft",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-m",
        "set",
        "--match-set",
        NAME,
        "src",
        "-j",
        "MARK",
        "--set-mark",
        "0x100",
        netns=netns,
    )
    assert references(sh, netns) == 1
    # Members and options both change while iptables uses the set: done with a swap, reference intact.
    result = ipset(netns, members=["10.0.0.2", "10.0.0.3"], options={"maxelem": 1000, "comment": "ztmesh"})
    assert result["changed"] is True and result["removed"] == ["10.0.0.1"], result
    save = sh("ipset", "save", NAME, netns=netns).stdout
    assert "maxelem 1000" in save and 'add ztunnel-pods-ips 10.0.0.2 comment "ztmesh"' in save
    assert references(sh, netns) == 1
    assert not [n for n in sh("ipset", "list", "-n", netns=netns).stdout.split() if n.endswith("-ztmp")]
    assert (
        ipset(netns, members=["10.0.0.2", "10.0.0.3"], options={"maxelem": 1000, "comment": "ztmesh"})[
            "changed"
        ]
        is False
    )

    # A type change cannot be swapped; while iptables uses the set it is refused with advice.
    before = ipset_save(sh, netns)
    result = ipset(netns, type="hash:net", members=["10.0.0.0/24"])
    assert result.get("failed") and "in use by 1 kernel object" in result["msg"], result
    assert ipset_save(sh, netns) == before
    result = ipset(netns, state="absent")
    assert result.get("failed") and "cannot be destroyed" in result["msg"]
    assert ipset_save(sh, netns) == before

    sh("iptables-nft", "-t", "mangle", "-F", "PREROUTING", netns=netns)
    result = ipset(netns, type="hash:net", members=["10.0.0.0/24", "10.1.0.1/32"])
    assert result["changed"] is True and result["members"] == ["10.0.0.0/24", "10.1.0.1"], result
    assert sh("ipset", "list", "-t", NAME, netns=netns).stdout.count("Type: hash:net") == 1
    assert ipset(netns, type="hash:net", members=["10.0.0.0/24", "10.1.0.1/32"])["changed"] is False


def test_merge_only_adds(netns, sh) -> None:
    assert ipset(netns, members=["10.0.0.1"])["changed"] is True
    result = ipset(netns, members=["10.0.0.2"], members_mode="merge")
    assert result["changed"] is True and result["added"] == ["10.0.0.2"] and result["removed"] == []
    assert members(sh, netns) == {"10.0.0.1", "10.0.0.2"}
    assert ipset(netns, members=["10.0.0.2"], members_mode="merge")["changed"] is False


def test_bad_input_changes_nothing(netns, sh) -> None:
    assert ipset(netns, members=["10.0.0.1"])["changed"] is True
    before = ipset_save(sh, netns)
    for args, message in (
        ({"members": ["10.0.0.0/24"]}, "hash:net"),
        ({"members": ["fd00::1"]}, "family inet6"),
        ({"type": "hash:net", "members": ["10.0.0.1/8"]}, "write the network as 10.0.0.0/8"),
        ({"type": "hash:ip,port", "members": ["10.0.0.1,tcp:99999"]}, "rejects the desired state"),
        ({"name": "n" * 32}, "1..31"),
    ):
        result = ipset(netns, **args)
        assert result.get("failed") and message in result["msg"], (args, result)
        assert ipset_save(sh, netns) == before
