"""Lifecycle of roles/ztmesh_node on a simulated node that already has its own rules: check mode on a
fresh node, idempotence, the boot-time script rebuilding exactly what the modules built, and an
uninstall that leaves every kernel object as it was.

The tests of this module run in order and share one node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dataplane"))
from dp_harness import Node, Topology, netns_exists, run_role, sh, snapshot  # noqa: E402

pytestmark = pytest.mark.timeout(600)

FOREIGN = [
    ("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT"),
    ("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.124.1.0/24", "!", "-o", "cbr0",
     "-j", "MASQUERADE"),
    ("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"),
    ("iptables", "-P", "FORWARD", "DROP"),
    ("ip", "route", "add", "10.200.0.0/16", "via", "10.123.0.9", "table", "200"),
    ("ip", "rule", "add", "pref", "500", "from", "10.124.1.0/24", "lookup", "200"),
    ("ipset", "create", "operator-set", "hash:net"),
    # strict reverse-path filtering host-wide: the role must make it loose and give it back
    ("sysctl", "-w", "net.ipv4.conf.all.rp_filter=1"),
]


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    topo = Topology(f"dpl{os.getpid() % 100000}", nodes=1)
    node = topo.nodes[0]
    for argv in FOREIGN:
        sh(*argv, ns=node.ns)
    node.before = snapshot(node.ns)  # type: ignore[attr-defined]
    try:
        yield node
    finally:
        topo.close()


def test_check_mode_on_a_fresh_node_changes_nothing(node):
    result = run_role(node, check=True, diff=True)
    assert result["changed_tasks"], "check mode must report what a real run would do"
    assert snapshot(node.ns) == node.before
    assert not netns_exists(node.proxy_ns)
    assert not node.dp_dir.exists()


def test_apply_then_a_second_run_changes_nothing(node):
    first = run_role(node)
    assert first["stats"]["changed"] > 0
    second = run_role(node)
    assert second["stats"]["changed"] == 0, second["changed_tasks"]
    assert run_role(node, check=True, diff=True)["stats"]["changed"] == 0
    sysctl = sh("sysctl", "-n", "net.ipv4.conf.all.rp_filter", "net.ipv4.ip_forward", ns=node.ns)
    assert sysctl.stdout.split() == ["2", "1"]
    after = snapshot(node.ns)
    for rule in ("-A PREROUTING -p tcp -m tcp --dport 9999 -j ACCEPT",
                 "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"):
        assert rule in after["iptables"]["nft"], "foreign rules must stay"
    assert "500:\tfrom 10.124.1.0/24 lookup 200" in after["rules"]


def test_boot_script_rebuilds_exactly_what_the_modules_built(node, tmp_path):
    built = {"node": snapshot(node.ns), "proxy": snapshot(node.proxy_ns)}
    saved = tmp_path / "dataplane"
    shutil.copytree(node.dp_dir, saved)
    run_role(node, action="uninstall")
    assert not netns_exists(node.proxy_ns)

    shutil.copytree(saved, node.dp_dir)  # what a reboot finds on disk
    for _ in range(2):  # and it is idempotent
        proc = subprocess.run([str(node.dp_dir / "ztmesh-dataplane"), "start"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        rebuilt = {"node": snapshot(node.ns), "proxy": snapshot(node.proxy_ns)}
        for side in ("node", "proxy"):
            for kind in built[side]:
                assert rebuilt[side][kind] == built[side][kind], (side, kind)
    # the modules agree: nothing to change after the script, except the unit file that the uninstall
    # above removed from the (test's) systemd directory
    changed = run_role(node)["changed_tasks"]
    unit_task = "ztmesh.mesh.ztmesh_node : Install the systemd unit that rebuilds the data plane at boot"
    assert changed == [unit_task], changed


def test_uninstall_leaves_the_node_as_it_was(node):
    result = run_role(node, action="uninstall")
    assert result["stats"]["changed"] > 0
    after = snapshot(node.ns)
    for kind in node.before:
        assert after[kind] == node.before[kind], kind
    assert not netns_exists(node.proxy_ns)
    assert not node.dp_dir.exists()
    again = run_role(node, action="uninstall")
    assert again["stats"]["changed"] == 0, again["changed_tasks"]
