"""Geneve, which this machine's kernel lacks, on a real Debian 12 kernel in a VM, driven over SSH."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
# The tasks whose changes the test counts: the tunnel tasks of geneve.yml, not the runtime staging
# around them (which changes /tmp on every run, and removes what it staged again).
TUNNEL_TASKS = {task["name"] for task in yaml.safe_load((PLAYBOOKS / "geneve.yml").read_text())[0]["tasks"]}


# A one-shot echo server on the peer's tunnel address, 192.168.126.2:7000.
_ECHO_ONCE = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              "s.bind((\"192.168.126.2\", 7000)); s.listen(1); s.settimeout(60); c, _ = s.accept(); "
              "c.sendall(c.recv(100))")


def _changed_tunnel_tasks(run: subprocess.CompletedProcess) -> list[str]:
    """The tunnel tasks that reported a change, from the json callback's report of a successful run."""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["stats"]["vm1"]["failures"] == 0, run.stdout[-6000:]
    return [task["task"]["name"] for play in report["plays"] for task in play["tasks"]
            if task["task"]["name"] in TUNNEL_TASKS and task["hosts"].get("vm1", {}).get("changed")]


@pytest.mark.timeout(1200)
def test_geneve_tunnel_lifecycle_on_real_kernel(vm, tmp_path: Path) -> None:
    inventory = vm.inventory(tmp_path / "inventory.yml")
    first = vm.playbook(PLAYBOOKS / "geneve.yml", inventory, json=True)
    assert len(_changed_tunnel_tasks(first)) >= 3

    details = vm.ssh("ip -d link show gtest").stdout
    assert "geneve id 1000" in details and "remote 10.99.0.2" in details and "dstport 6081" in details
    # Real packets through the tunnel: a TCP exchange with a server in the peer namespace, which is
    # reachable only over Geneve (the node's own python3: the VM is a baseline node, no ping).
    exchange = vm.ssh(
        "ip netns exec vmpeer python3 -c '" + _ECHO_ONCE + "' & sleep 2; "
        "python3 -c 'import socket; s = socket.create_connection((\"192.168.126.2\", 7000), timeout=10); "
        "s.sendall(b\"through geneve\"); print(s.recv(100).decode())'; wait", check=False)
    assert exchange.returncode == 0 and "through geneve" in exchange.stdout, exchange.stdout + exchange.stderr
    assert "ztmesh-runtime." not in vm.ssh("ls /tmp").stdout, "the staged runtime was left in /tmp"

    again = vm.playbook(PLAYBOOKS / "geneve.yml", inventory, json=True)
    assert _changed_tunnel_tasks(again) == []

    # Drift: the link deleted by hand is restored exactly, and the run says so.
    vm.ssh("ip link del gtest")
    repair = vm.playbook(PLAYBOOKS / "geneve.yml", inventory, json=True)
    assert _changed_tunnel_tasks(repair) == ["Geneve end in the VM's namespace"]
    assert "geneve id 1000" in vm.ssh("ip -d link show gtest").stdout

    gone = vm.playbook(PLAYBOOKS / "geneve.yml", inventory, "-e", "tunnel_state=absent")
    assert gone.returncode == 0, gone.stdout[-6000:]
    assert vm.ssh("ip link show gtest", check=False).returncode != 0
    assert "vmpeer" not in vm.ssh("ip netns list").stdout
