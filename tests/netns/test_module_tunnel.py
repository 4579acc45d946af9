"""ztmesh_tunnel against the real kernel, inside throwaway namespaces (vxlan: this kernel lacks Geneve)."""

from __future__ import annotations

import json

import pytest
from ansible_module import run_module

pytestmark = pytest.mark.timeout(120)

INBOUND = {"name": "istioin", "kind": "vxlan", "vni": 1000, "remote": "192.168.125.2",
           "address": "192.168.126.1/30"}


def link_details(sh, netns: str, name: str) -> dict:
    """``ip -d -j link`` + addresses of one link, parsed; {} when it does not exist."""
    proc = sh("ip", "-d", "-j", "addr", "show", "dev", name, netns=netns, check=False)
    if proc.returncode != 0:
        return {}
    return json.loads(proc.stdout)[0]


def snapshot(sh, netns: str) -> list:
    """The namespace's links and addresses, for "nothing changed" (minus IPv6 DAD's passing flags)."""
    links = json.loads(sh("ip", "-d", "-j", "addr", "show", netns=netns).stdout)
    return [(link["ifindex"], link["ifname"], link["mtu"], sorted(link["flags"]), link.get("linkinfo"),
             sorted((a["family"], a["local"], a["prefixlen"]) for a in link["addr_info"]))
            for link in links]


def tunnel(netns: str, **overrides) -> dict:
    return {**INBOUND, "netns": netns, **overrides}


def test_creates_vxlan_exactly_as_declared(netns, sh):
    result = run_module("ztmesh_tunnel", tunnel(netns, mtu=1400))
    assert result.get("failed") is not True, result.get("msg")
    assert result["changed"] is True
    info = link_details(sh, netns, "istioin")
    data = info["linkinfo"]["info_data"]
    assert info["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["remote"], data["port"]) == (1000, "192.168.125.2", 4789)
    assert info["mtu"] == 1400
    assert "UP" in info["flags"]
    assert [f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"] if a["family"] == "inet"] == [
        "192.168.126.1/30"]
    link = result["link"]
    assert link["ifindex"] == info["ifindex"]
    assert (link["kind"], link["vni"], link["port"], link["address"], link["link_state"]) == (
        "vxlan", 1000, 4789, "192.168.126.1/30", "up")


def test_second_run_changes_nothing(netns, sh):
    run_module("ztmesh_tunnel", tunnel(netns))
    before = snapshot(sh, netns)
    result = run_module("ztmesh_tunnel", tunnel(netns))
    assert result["changed"] is False
    assert snapshot(sh, netns) == before


def test_drift_is_repaired(netns, sh):
    run_module("ztmesh_tunnel", tunnel(netns))
    sh("ip", "addr", "del", "192.168.126.1/30", "dev", "istioin", netns=netns)
    sh("ip", "addr", "add", "10.99.0.1/24", "dev", "istioin", netns=netns)
    sh("ip", "link", "set", "istioin", "down", netns=netns)
    result = run_module("ztmesh_tunnel", tunnel(netns))
    assert result["changed"] is True and result["recreated"] is False
    info = link_details(sh, netns, "istioin")
    assert "UP" in info["flags"]
    assert [a["local"] for a in info["addr_info"] if a["family"] == "inet"] == ["192.168.126.1"]

    sh("ip", "link", "del", "istioin", netns=netns)
    result = run_module("ztmesh_tunnel", tunnel(netns))
    assert result["changed"] is True
    assert link_details(sh, netns, "istioin")["linkinfo"]["info_data"]["id"] == 1000


def test_check_mode_changes_nothing_and_predicts(netns, sh):
    before = snapshot(sh, netns)
    result = run_module("ztmesh_tunnel", tunnel(netns), check=True, diff=True)
    assert result["changed"] is True
    assert snapshot(sh, netns) == before
    assert result["diff"]["before"] == {}
    assert result["diff"]["after"]["vni"] == 1000 and result["diff"]["after"]["address"] == "192.168.126.1/30"

    run_module("ztmesh_tunnel", tunnel(netns))
    before = snapshot(sh, netns)
    result = run_module("ztmesh_tunnel", tunnel(netns, vni=2000), check=True)
    assert result["changed"] is True and result["recreated"] is True
    assert snapshot(sh, netns) == before


def test_diff_shows_the_changed_fields(netns):
    run_module("ztmesh_tunnel", tunnel(netns))
    result = run_module("ztmesh_tunnel", tunnel(netns, mtu=1300, link_state="down"), diff=True)
    before, after = result["diff"]["before"], result["diff"]["after"]
    assert (before["mtu"], before["link_state"]) == (1500, "up")
    assert (after["mtu"], after["link_state"]) == (1300, "down")
    assert "diff" not in run_module("ztmesh_tunnel", tunnel(netns))  # only in diff mode


def test_identity_change_recreates_or_refuses(netns, sh):
    run_module("ztmesh_tunnel", tunnel(netns))
    before = snapshot(sh, netns)
    refused = run_module("ztmesh_tunnel", tunnel(netns, vni=2000, force=False))
    assert refused["failed"] is True
    assert "vni 1000 (wanted 2000)" in refused["msg"] and "force: true" in refused["msg"]
    assert snapshot(sh, netns) == before

    result = run_module("ztmesh_tunnel", tunnel(netns, vni=2000, port=8472))
    assert result["changed"] is True and result["recreated"] is True
    data = link_details(sh, netns, "istioin")["linkinfo"]["info_data"]
    assert (data["id"], data["port"]) == (2000, 8472)


def test_absent_removes_the_link_only(netns, sh):
    run_module("ztmesh_tunnel", tunnel(netns))
    run_module("ztmesh_tunnel", tunnel(netns, name="istioout", vni=1001, address="192.168.127.1/30"))
    result = run_module("ztmesh_tunnel", {"name": "istioin", "state": "absent", "netns": netns})
    assert result["changed"] is True
    assert link_details(sh, netns, "istioin") == {}
    assert link_details(sh, netns, "istioout") != {}
    again = run_module("ztmesh_tunnel", {"name": "istioin", "state": "absent", "netns": netns})
    assert again["changed"] is False


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"address": "192.168.126.1"}, "prefix length"),
        ({"address": "192.168.126.300/30"}, "prefix length"),
        ({"vni": 16777216}, "24 bits"),
        ({"remote": "239.1.1.1"}, "unicast"),
        ({"remote": "not-an-ip"}, "IPv4 address"),
        ({"kind": "geneve", "local": "10.0.0.1"}, "only supported by kind: vxlan"),
        ({"name": "a-very-long-tunnel-name"}, "at most 15"),
        ({"mtu": 70000}, "mtu 70000"),
    ],
)
def test_bad_input_fails_and_changes_nothing(netns, sh, overrides, fragment):
    run_module("ztmesh_tunnel", tunnel(netns))
    before = snapshot(sh, netns)
    result = run_module("ztmesh_tunnel", tunnel(netns, **{"vni": 1001, **overrides}))
    assert result["failed"] is True
    assert fragment in result["msg"] and "nothing was changed" in result["msg"]
    assert snapshot(sh, netns) == before


def test_geneve_on_this_kernel_fails_naming_config_geneve(netns, sh):
    # Some kernels, such as this test machine's, are built without CONFIG_GENEVE (docs/inventory.md,
    # ztmesh_tunnel_kind); confirm it independently of the module, so the test states a fact rather than
    # assumes it.
    probe = sh("ip", "link", "add", "gprobe", "type", "geneve", "id", "1", "remote", "192.0.2.1",
               netns=netns, check=False)
    if probe.returncode == 0:
        pytest.skip("this kernel has Geneve: the missing-kind path cannot be exercised here")
    run_module("ztmesh_tunnel", tunnel(netns))  # a vxlan istioin the geneve request would replace
    before = snapshot(sh, netns)
    result = run_module("ztmesh_tunnel", tunnel(netns, kind="geneve"))
    assert result["failed"] is True
    assert "CONFIG_GENEVE" in result["msg"]
    assert "ztmesh_tunnel_kind: vxlan" in result["msg"]
    assert snapshot(sh, netns) == before
    check = run_module("ztmesh_tunnel", tunnel(netns, name="fresh", kind="geneve"), check=True)
    assert check["failed"] is True and "CONFIG_GENEVE" in check["msg"]


def test_refuses_to_replace_a_non_tunnel_link(netns, sh):
    sh("ip", "link", "add", "istioin", "type", "veth", "peer", "name", "other", netns=netns)
    before = snapshot(sh, netns)
    result = run_module("ztmesh_tunnel", tunnel(netns))
    assert result["failed"] is True and "never deletes it" in result["msg"]
    absent = run_module("ztmesh_tunnel", {"name": "istioin", "state": "absent", "netns": netns})
    assert absent["failed"] is True
    assert snapshot(sh, netns) == before


def test_unknown_netns_fails_clearly():
    result = run_module("ztmesh_tunnel", tunnel("ztmesh-does-not-exist"))
    assert result["failed"] is True and "does not exist" in result["msg"]
