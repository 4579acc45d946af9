"""Geneve, which this machine's kernel lacks, on a real Debian 12 kernel in a VM, driven over SSH."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"


def _recap_changed(output: str) -> int:
    match = re.search(r"vm1\s*:\s*ok=\d+\s+changed=(\d+)", output)
    assert match, f"no play recap in:\n{output[-3000:]}"
    return int(match.group(1))


@pytest.mark.timeout(1200)
def test_geneve_tunnel_lifecycle_on_real_kernel(vm, tmp_path: Path) -> None:
    inventory = vm.inventory(tmp_path / "inventory.yml")
    first = vm.playbook(PLAYBOOKS / "geneve.yml", inventory)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    assert _recap_changed(first.stdout) >= 3

    details = vm.ssh("ip -d link show gtest").stdout
    assert "geneve id 1000" in details and "remote 10.99.0.2" in details and "dstport 6081" in details
    # Real packets through the tunnel: the peer end answers over Geneve.
    ping = vm.ssh("ping -c 3 -W 2 192.168.126.2", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    again = vm.playbook(PLAYBOOKS / "geneve.yml", inventory)
    assert again.returncode == 0, again.stdout[-6000:]
    assert _recap_changed(again.stdout) == 0, again.stdout[-6000:]

    # Drift: the link deleted by hand is restored exactly, and the run says so.
    vm.ssh("ip link del gtest")
    repair = vm.playbook(PLAYBOOKS / "geneve.yml", inventory)
    assert repair.returncode == 0, repair.stdout[-6000:]
    assert _recap_changed(repair.stdout) == 1, repair.stdout[-6000:]
    assert "geneve id 1000" in vm.ssh("ip -d link show gtest").stdout

    gone = vm.playbook(PLAYBOOKS / "geneve.yml", inventory, "-e", "tunnel_state=absent")
    assert gone.returncode == 0, gone.stdout[-6000:]
    assert vm.ssh("ip link show gtest", check=False).returncode != 0
    assert "vmpeer" not in vm.ssh("ip netns list").stdout
