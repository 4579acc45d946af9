"""ztmesh_netns against the real kernel: the namespace it creates is unique per test and always removed;
the host end of the veth lives in a throwaway namespace (``netns`` fixture), never in the root one."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_module import run_module

pytestmark = pytest.mark.timeout(120)

_names = itertools.count()


@pytest.fixture
def proxy_ns() -> Iterator[str]:
    """A unique name for the namespace the module creates; deleted afterwards, whatever happened."""
    name = f"ztp-{os.getpid()}-{next(_names)}"
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert not os.path.lexists(f"/run/netns/{name}")


def spec(proxy_ns: str, host_ns: str, **veth) -> dict:
    return {"name": proxy_ns, "netns": host_ns,
            "veth": {"host_ifname": "ztproxy0", "host_address": "192.168.125.1/30",
                     "peer_address": "192.168.125.2/30", **veth}}


def addresses(sh, netns: str, ifname: str) -> list:
    proc = sh("ip", "-j", "-4", "addr", "show", "dev", ifname, netns=netns, check=False)
    if proc.returncode != 0:
        return []
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(proc.stdout) for a in link["addr_info"]]


def link(sh, netns: str, ifname: str) -> dict:
    proc = sh("ip", "-d", "-j", "link", "show", "dev", ifname, netns=netns, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else {}


def assert_tcp_reaches(server_ns: str, client_ns: str, address: str) -> None:
    """The pair really connects the two namespaces: a TCP exchange from one to the other."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "socat", "-T", "5", f"TCP-LISTEN:9000,bind={address}",
         "SYSTEM:echo ztmesh"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(50):
            reply = subprocess.run(["ip", "netns", "exec", client_ns, "socat", "-T", "2", "-",
                                    f"TCP:{address}:9000"], input="", capture_output=True, text=True)
            if reply.returncode == 0:
                break
            time.sleep(0.1)
        assert reply.stdout.strip() == "ztmesh", reply.stderr
    finally:
        server.kill()
        server.wait()


def test_creates_namespace_veth_and_addresses(netns, proxy_ns, sh):
    result = run_module("ztmesh_netns", spec(proxy_ns, netns, mtu=1400))
    assert result.get("failed") is not True, result.get("msg")
    assert result["changed"] is True
    # A normal named namespace: ip netns sees it and ip netns exec works in it.
    assert proxy_ns in sh("ip", "netns", "list").stdout
    peer = link(sh, proxy_ns, "eth0")
    host = link(sh, netns, "ztproxy0")
    assert host["linkinfo"]["info_kind"] == peer["linkinfo"]["info_kind"] == "veth"
    assert host["mtu"] == peer["mtu"] == 1400
    assert "UP" in host["flags"] and "UP" in peer["flags"]
    assert "UP" in link(sh, proxy_ns, "lo")["flags"]
    assert addresses(sh, netns, "ztproxy0") == ["192.168.125.1/30"]
    assert addresses(sh, proxy_ns, "eth0") == ["192.168.125.2/30"]
    assert result["veth"] == {"host_ifname": "ztproxy0", "peer_ifname": "eth0", "mtu": 1400,
                              "host_address": "192.168.125.1/30", "peer_address": "192.168.125.2/30"}
    assert_tcp_reaches(proxy_ns, netns, "192.168.125.2")


def test_second_run_changes_nothing(netns, proxy_ns, sh):
    run_module("ztmesh_netns", spec(proxy_ns, netns))
    host_index = link(sh, netns, "ztproxy0")["ifindex"]
    result = run_module("ztmesh_netns", spec(proxy_ns, netns))
    assert result["changed"] is False and result["actions"] == []
    assert link(sh, netns, "ztproxy0")["ifindex"] == host_index


def test_drift_is_repaired(netns, proxy_ns, sh):
    run_module("ztmesh_netns", spec(proxy_ns, netns))
    sh("ip", "addr", "flush", "dev", "eth0", netns=proxy_ns)
    sh("ip", "addr", "add", "10.1.1.1/24", "dev", "eth0", netns=proxy_ns)
    sh("ip", "link", "set", "lo", "down", netns=proxy_ns)
    result = run_module("ztmesh_netns", spec(proxy_ns, netns))
    assert result["changed"] is True
    assert result["actions"] == ["set lo up", "set peer address 192.168.125.2/30"]
    assert addresses(sh, proxy_ns, "eth0") == ["192.168.125.2/30"]
    assert "UP" in link(sh, proxy_ns, "lo")["flags"]

    sh("ip", "link", "del", "ztproxy0", netns=netns)  # takes the peer with it
    result = run_module("ztmesh_netns", spec(proxy_ns, netns))
    assert "create veth pair" in result["actions"]
    assert addresses(sh, netns, "ztproxy0") == ["192.168.125.1/30"]
    assert addresses(sh, proxy_ns, "eth0") == ["192.168.125.2/30"]


def test_check_mode_changes_nothing(netns, proxy_ns, sh):
    result = run_module("ztmesh_netns", spec(proxy_ns, netns), check=True, diff=True)
    assert result["changed"] is True
    assert result["actions"][:3] == ["create namespace", "set lo up", "create veth pair"]
    assert not os.path.lexists(f"/run/netns/{proxy_ns}")
    assert link(sh, netns, "ztproxy0") == {}
    assert result["diff"]["before"]["exists"] is False
    assert result["diff"]["after"]["veth"]["peer_addresses"] == ["192.168.125.2/30"]

    run_module("ztmesh_netns", spec(proxy_ns, netns))
    sh("ip", "addr", "flush", "dev", "ztproxy0", netns=netns)
    result = run_module("ztmesh_netns", spec(proxy_ns, netns), check=True)
    assert result["changed"] is True and result["actions"] == ["set host address 192.168.125.1/30"]
    assert addresses(sh, netns, "ztproxy0") == []


def test_diff_shows_the_address_change(netns, proxy_ns):
    run_module("ztmesh_netns", spec(proxy_ns, netns))
    result = run_module("ztmesh_netns", spec(proxy_ns, netns, peer_address="192.168.125.2/29"), diff=True)
    assert result["diff"]["before"]["veth"]["peer_addresses"] == ["192.168.125.2/30"]
    assert result["diff"]["after"]["veth"]["peer_addresses"] == ["192.168.125.2/29"]


def test_absent_removes_namespace_and_veth(netns, proxy_ns, sh):
    run_module("ztmesh_netns", spec(proxy_ns, netns))
    result = run_module("ztmesh_netns", {**spec(proxy_ns, netns), "state": "absent"}, check=True)
    assert result["changed"] is True and os.path.lexists(f"/run/netns/{proxy_ns}")
    result = run_module("ztmesh_netns", {**spec(proxy_ns, netns), "state": "absent"})
    assert result["changed"] is True
    assert not os.path.lexists(f"/run/netns/{proxy_ns}")
    assert link(sh, netns, "ztproxy0") == {}
    again = run_module("ztmesh_netns", {**spec(proxy_ns, netns), "state": "absent"})
    assert again["changed"] is False


def test_namespace_without_veth(netns, proxy_ns, sh):
    result = run_module("ztmesh_netns", {"name": proxy_ns, "netns": netns})
    assert result["changed"] is True and result["veth"] == {}
    assert "UP" in link(sh, proxy_ns, "lo")["flags"]
    assert run_module("ztmesh_netns", {"name": proxy_ns, "netns": netns})["changed"] is False


@pytest.mark.parametrize(
    ("veth", "fragment"),
    [
        ({"host_address": "192.168.125.1"}, "prefix length"),
        ({"peer_address": "192.168.125.0/30"}, "network or broadcast"),
        ({"host_ifname": "much-too-long-name"}, "at most 15"),
        ({"peer_ifname": "lo"}, "loopback"),
    ],
)
def test_bad_input_fails_and_creates_nothing(netns, proxy_ns, sh, veth, fragment):
    result = run_module("ztmesh_netns", spec(proxy_ns, netns, **veth))
    assert result["failed"] is True
    assert fragment in result["msg"] and "nothing was changed" in result["msg"]
    assert not os.path.lexists(f"/run/netns/{proxy_ns}")
    assert [entry["ifname"] for entry in json.loads(sh("ip", "-j", "link", netns=netns).stdout)] == ["lo"]


def test_refuses_to_take_over_a_non_veth_host_link(netns, proxy_ns, sh):
    sh("ip", "link", "add", "ztproxy0", "type", "vxlan", "id", "5", "remote", "10.0.0.1", "dstport",
       "4789", netns=netns)
    result = run_module("ztmesh_netns", spec(proxy_ns, netns))
    assert result["failed"] is True and "not a veth" in result["msg"]
    assert link(sh, netns, "ztproxy0")["linkinfo"]["info_kind"] == "vxlan"
    assert not os.path.lexists(f"/run/netns/{proxy_ns}")


def test_release_run_dir_undoes_the_first_ip_netns_add(tmp_path):
    """On a host without /run/netns, creating a namespace makes it (a shared mount point); absent with
    release_run_dir puts the host back. Run in a private mount namespace with its own empty /run, so the
    real /run/netns (and every namespace of other tests) is never touched."""
    script = tmp_path / "release.py"
    script.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from ansible_module import run_module\n"
        "seen = {'before': os.path.exists('/run/netns')}\n"
        "seen['create'] = run_module('ztmesh_netns', {'name': 'ztrel'})['changed']\n"
        "seen['dir_after_create'] = os.path.isdir('/run/netns')\n"
        "keep = run_module('ztmesh_netns', {'name': 'ztrel', 'state': 'absent'}, check=True)\n"
        "seen['check_actions'] = keep['actions']\n"
        "gone = run_module('ztmesh_netns', {'name': 'ztrel', 'state': 'absent', 'release_run_dir': True})\n"
        "seen['absent_actions'] = gone['actions']\n"
        "seen['after'] = os.path.exists('/run/netns')\n"
        "again = run_module('ztmesh_netns', {'name': 'ztrel', 'state': 'absent', 'release_run_dir': True})\n"
        "seen['second_changed'] = again['changed']\n"
        "print(json.dumps(seen))\n"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs ztmesh-test-run /run && exec {sys.executable} {script}"],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {
        "before": False, "create": True, "dir_after_create": True,
        "check_actions": ["delete namespace"],
        "absent_actions": ["delete namespace", "release /run/netns"],
        "after": False, "second_changed": False,
    }, seen
