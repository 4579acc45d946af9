"""Geneve, which this machine's kernel lacks, built by the tunnel module alone on a real Debian 12
kernel, driven over SSH: create, idempotence, drift repair, removal.

It runs on vm1 of the fleet after mesh.yml (the modules need pyroute2, which a baseline node lacks and
the ztmesh runtime that mesh.yml installs has), with that runtime as the modules' interpreter; it
leaves nothing behind (the fleet's uninstall snapshot comes later)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vmtier import Fleet, playbook, playbook_failure, recap

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
pytestmark = pytest.mark.timeout(1800)

PEER_SERVER = ("ip netns exec vmpeer timeout 60 python3 -c \"import socket; s = socket.create_server(("
               "'192.168.226.2', 7000)); c, _ = s.accept(); c.sendall(b'geneve-ok'); c.close()\" "
               ">/dev/null 2>&1 &")
CLIENT = ("python3 -c \"import socket, time\nfor _ in range(20):\n    try:\n"
          "        c = socket.create_connection(('192.168.226.2', 7000), 2)\n"
          "        print(c.recv(100).decode()); break\n"
          "    except OSError:\n        time.sleep(0.5)\"")


def _changed(output: str) -> int:
    hosts = recap(output)
    assert "vm1" in hosts, f"no play recap in:\n{output[-3000:]}"
    return hosts["vm1"]["changed"]


def test_geneve_tunnel_lifecycle_on_real_kernel(fleet: Fleet, tmp_path: Path) -> None:
    fleet.require("mesh")
    vm = fleet.vms["vm1"]
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": {"vm1": {
        "ansible_host": vm.address, "ansible_user": "root", "ansible_ssh_private_key_file": str(vm.key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/opt/ztmesh/venv/bin/python"}}}}))
    book = PLAYBOOKS / "geneve.yml"

    first = playbook("geneve-1", inventory, book)
    assert first.returncode == 0, playbook_failure(first, "geneve-1")
    assert _changed(first.stdout) >= 3
    details = vm.ssh("ip -d link show gtest").stdout
    assert "geneve id 2000" in details and "remote 10.99.0.2" in details and "dstport 6082" in details
    # Real packets through the tunnel: a TCP exchange with the far end, which answers over Geneve.
    vm.ssh(PEER_SERVER)
    assert vm.ssh(CLIENT).stdout.strip() == "geneve-ok"

    again = playbook("geneve-2", inventory, book)
    assert again.returncode == 0, playbook_failure(again, "geneve-2")
    assert _changed(again.stdout) == 0, again.stdout[-6000:]

    # Drift: the link deleted by hand is restored exactly, and the run says so.
    vm.ssh("ip link del gtest")
    repair = playbook("geneve-repair", inventory, book)
    assert repair.returncode == 0, playbook_failure(repair, "geneve-repair")
    assert _changed(repair.stdout) == 1, repair.stdout[-6000:]
    assert "geneve id 2000" in vm.ssh("ip -d link show gtest").stdout

    gone = playbook("geneve-absent", inventory, book, "-e", "tunnel_state=absent")
    assert gone.returncode == 0, playbook_failure(gone, "geneve-absent")
    assert vm.ssh("ip link show gtest", check=False).returncode != 0
    assert "vmpeer" not in vm.ssh("ip netns list").stdout
