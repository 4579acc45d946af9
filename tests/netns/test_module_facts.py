"""ztmesh_facts against the real host: every fact is checked against an independent observation, and
gathering changes nothing in the namespace it looks at."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from ansible_module import run_module

pytestmark = pytest.mark.timeout(120)


def state_of(sh, netns: str) -> tuple:
    links = json.loads(sh("ip", "-j", "link", netns=netns).stdout)
    legacy = sh("iptables-legacy-save", netns=netns).stdout
    nft = sh("iptables-nft-save", netns=netns).stdout
    ipsets = sh("ipset", "list", "-n", netns=netns).stdout
    strip = re.compile(r"^#.*$", re.M)  # save commands print a timestamp comment
    return ([link["ifname"] for link in links], strip.sub("", legacy), strip.sub("", nft), ipsets)


def can_create(sh, netns: str, *link_args: str) -> bool:
    proc = sh("ip", "link", "add", "zfprobe", *link_args, netns=netns, check=False)
    sh("ip", "link", "del", "zfprobe", netns=netns, check=False)
    return proc.returncode == 0


def facts(netns: str, check: bool = False) -> dict:
    result = run_module("ztmesh_facts", {"netns": netns}, check=check)
    assert result.get("failed") is not True, result.get("msg")
    assert result["changed"] is False
    return result["ansible_facts"]["ztmesh"]


def test_facts_match_the_host_and_change_nothing(make_netns, sh):
    netns, scratch = make_netns(), make_netns()
    sh("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward", netns=netns)  # copied from the root ns
    before = state_of(sh, netns)
    found = facts(netns)
    assert state_of(sh, netns) == before
    assert found["kernel"] == os.uname().release
    assert found["tunnel_kinds"] == {
        "geneve": can_create(sh, scratch, "type", "geneve", "id", "1", "remote", "192.0.2.1"),
        "vxlan": can_create(sh, scratch, "type", "vxlan", "id", "1", "remote", "192.0.2.1",
                            "dstport", "4789"),
    }
    if not found["tunnel_kinds"]["geneve"]:
        assert "Operation not supported" in found["tunnel_kind_errors"]["geneve"]
    assert found["netns_supported"] is True
    assert found["ip_forward"] is False
    tproxy = sh("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "TPROXY", "--on-port",
                "15001", "--tproxy-mark", "0x400/0xfff", netns=scratch, check=False)
    assert found["tproxy"] is (tproxy.returncode == 0)
    ipset_version = sh("ipset", "version").stdout
    assert found["ipset"]["tool"] is True and found["ipset"]["version"] in ipset_version
    assert found["ipset"]["kernel"] is (sh("ipset", "create", "zf", "hash:ip", netns=scratch,
                                           check=False).returncode == 0)


def test_ip_forward_is_read_in_the_namespace(netns, sh):
    sh("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward", netns=netns)
    assert facts(netns)["ip_forward"] is True


def test_iptables_backend_follows_the_rules_in_use(netns, sh):
    default = sh("iptables", "--version").stdout
    expected_default = "nft" if "nf_tables" in default else "legacy"
    assert facts(netns)["iptables"]["backend"] == expected_default

    # Whichever backend holds the rules wins, like kube-proxy's iptables-wrapper decides.
    other = "legacy" if expected_default == "nft" else "nft"
    for chain in ("A", "B"):
        sh(f"iptables-{other}", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "1", "-m", "comment",
           "--comment", chain, "-j", "ACCEPT", netns=netns)
    found = facts(netns, check=True)["iptables"]
    assert found["backend"] == other
    assert found["rule_counts"][other] == 2 and "more rules" in found["reason"]
    assert found["save"].endswith(f"iptables-{other}-save")
    assert found["restore"].endswith(f"iptables-{other}-restore")
    # The tables each backend has (reading them created none in the other backend).
    assert found["tables"][other] == ["filter"]
    assert found["tables"][expected_default] == []


def test_netns_run_dir_is_reported(netns):
    found = facts(netns)["netns_run_dir"]
    # The test's own namespace lives in /run/netns, so the directory exists here.
    # findmnt (util-linux) is the independent judge of "is a mount point".
    mounted = subprocess.run(["findmnt", "--mountpoint", "/run/netns"], capture_output=True).returncode == 0
    assert found == {"exists": True, "mounted": mounted}


def test_ztmesh_chains_pin_the_backend(netns, sh):
    default = "nft" if "nf_tables" in sh("iptables", "--version").stdout else "legacy"
    other = "legacy" if default == "nft" else "nft"
    for n in range(3):  # the default backend has more rules, but ztmesh's chains live in the other
        sh(f"iptables-{default}", "-A", "INPUT", "-p", "tcp", "--dport", str(n + 1), "-j", "ACCEPT",
           netns=netns)
    sh(f"iptables-{other}", "-t", "mangle", "-N", "ztunnel-PREROUTING", netns=netns)
    found = facts(netns)["iptables"]
    assert found["backend"] == other and "ztmesh chains" in found["reason"]


def test_missing_pyroute2_is_named_as_a_library_not_a_kernel_feature(tmp_path):
    # A Python without pyroute2: a fresh virtual environment of the system's python3 (no site packages).
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = str(tmp_path / "bare" / "bin" / "python")
    assert subprocess.run([bare, "-c", "import pyroute2"], capture_output=True).returncode != 0
    result = run_module("ztmesh_facts", {}, interpreter=bare)
    assert result.get("failed"), result
    assert "pyroute2" in result["msg"] and bare in result["msg"], result["msg"]
    assert "kernel" not in result["msg"] and "tunnel_kind" not in result["msg"], result["msg"]
    assert "ansible_facts" not in result or not result["ansible_facts"], result
