"""cloud-init, booted: a 4th VM (the cloud-init variant of the image: the baseline plus cloud-init, as a
cloud image has it) starts with a NoCloud seed made from examples/cloud-init/user-data.yaml, the file
of the repository with only its documented placeholders filled in. At first boot it downloads the
controller's bundle (examples/cloud-init/build-bundle.sh) over the VM network, from a web server of
this test on the bridge address, and onboards itself with mesh.yml, fetching nothing else. Then it
talks to the fleet through the mesh as the fleet does: both directions, HBONE, both identities logged.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_vm_fleet import access_lines, fetch, journal, serve
from vmtier import LOGS, REPO, Fleet, build_image, make_vm, playbook_failure, recap, timed, write_inventory

USER_DATA = REPO / "examples" / "cloud-init" / "user-data.yaml"
BUILD_BUNDLE = REPO / "examples" / "cloud-init" / "build-bundle.sh"
ONBOARD_TIMEOUT = int(os.environ.get("ZTMESH_VM_CLOUD_INIT_TIMEOUT", "2400"))
pytestmark = pytest.mark.timeout(ONBOARD_TIMEOUT + 1800)


def user_data(bundle_url: str, digest: str, key: str, ca_host_line: str) -> str:
    """The repository's example with its documented placeholders replaced, and nothing else."""
    text = USER_DATA.read_text()
    placeholders = ("REPLACE-WITH-THE-BUNDLE-URL", "REPLACE-WITH-THE-BUNDLE-SHA256",
                    "REPLACE-WITH-THE-ENROLLMENT-KEY", "REPLACE-WITH-THE-CA-HOST-KEY")
    for placeholder in placeholders:
        assert text.count(placeholder) >= 1, f"{USER_DATA} no longer has the placeholder {placeholder}"
    indent = next(line[:len(line) - len(line.lstrip())] for line in text.splitlines()
                  if line.strip() == "REPLACE-WITH-THE-ENROLLMENT-KEY")
    # Outside the comments only (the header documents the placeholders by name).
    head, sep, body = text.partition("\nwrite_files:")
    body = (body.replace("REPLACE-WITH-THE-BUNDLE-URL", bundle_url)
            .replace("REPLACE-WITH-THE-BUNDLE-SHA256", digest)
            .replace("REPLACE-WITH-THE-ENROLLMENT-KEY", key.strip().replace("\n", "\n" + indent))
            .replace("REPLACE-WITH-THE-CA-HOST-KEY", ca_host_line.strip()))
    result = head + sep + body
    yaml.safe_load(result)
    return result


def bundle_inventory(controller_inventory: dict, ca_vm) -> dict:
    """What the cloud-init VM converges with: the fleet's inventory, without the controller's SSH
    settings, with a CA host it reaches over SSH: vm1, one of the fleet's signing services, whose
    /etc/ztmesh/ca holds the mesh CA (roles/ztmesh_ca serve), run with the ztmesh runtime's Python."""
    inventory = copy.deepcopy(controller_inventory)
    nodes = inventory["all"]["children"]["ztmesh_nodes"]
    for key in ("ansible_ssh_private_key_file", "ansible_ssh_common_args", "ansible_user"):
        nodes["vars"].pop(key)
    nodes["vars"].update(ztmesh_ca_host="ztmesh-ca", ztmesh_ca_dir="/etc/ztmesh/ca")
    inventory["all"]["hosts"] = {"ztmesh-ca": {
        "ansible_host": ca_vm.address, "ansible_connection": "ssh", "ansible_user": "root",
        "ansible_python_interpreter": "/opt/ztmesh/venv/bin/python"}}
    return inventory


def test_cloud_init_vm_onboards_itself_and_talks_through_the_mesh(fleet: Fleet, tmp_path: Path) -> None:
    fleet.require("mesh")
    image = build_image("cloud-init")
    plan = json.loads((image / "network.json").read_text())
    vm1, vm2 = fleet.vms["vm1"], fleet.vms["vm2"]
    vm4 = make_vm("vm4", 4, image, fleet.network, plan["cloud_init_mac"], plan["cloud_init_address"],
                  hostname=False)
    fleet.extra_vms.append(vm4)

    # The operator's side: vm4 joins the inventory, the running nodes learn about it.
    write_inventory(fleet.inventory, {**fleet.vms, "vm4": vm4}, fleet.workdir / "ca", fleet.package_dir)
    refresh = fleet.playbook("refresh-state-vm4", "playbooks/refresh-state.yml", "--limit", "vm1,vm2,vm3")
    assert refresh.returncode == 0, playbook_failure(refresh, "refresh-state-vm4")

    served = tmp_path / "served"
    inventory_file = tmp_path / "bundle-inventory.yml"
    inventory_file.write_text(yaml.safe_dump(bundle_inventory(json.loads(fleet.inventory.read_text()), vm1)))
    with timed("build the cloud-init bundle"):
        built = subprocess.run([str(BUILD_BUNDLE), "--inventory", str(inventory_file), "--packages",
                                str(fleet.package_dir), str(served)], capture_output=True, text=True,
                               timeout=1800, cwd=REPO)
    assert built.returncode == 0, f"build-bundle.sh failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    digest = built.stdout.strip().splitlines()[-1]

    port = 18080
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               fleet.network.host_address, "--directory", str(served)],
                              stdout=(LOGS / "bundle-server.log").open("w"), stderr=subprocess.STDOUT)
    try:
        seed = tmp_path / "seed"
        seed.mkdir()
        ca_key = vm1.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()
        (seed / "user-data").write_text(user_data(
            f"http://{fleet.network.host_address}:{port}/ztmesh-bundle.tar.gz", digest,
            vm4.key.read_text(), f"{vm1.address} {ca_key[0]} {ca_key[1]}"))
        (seed / "meta-data").write_text("instance-id: ztmesh-vm-tier-vm4\nlocal-hostname: vm4\n")
        (seed / "network-config").write_text(yaml.safe_dump({"version": 2, "ethernets": {"nic0": {
            "match": {"macaddress": vm4.mac}, "set-name": "ens3",
            "addresses": [f"{vm4.address}/{plan['prefix']}"]}}}))
        (LOGS / "cloud-init-user-data.yaml").write_text((seed / "user-data").read_text()
                                                        .replace(vm4.key.read_text().strip().split("\n")[1],
                                                                 "<key>"))
        vm4.argv += ["-drive", f"if=virtio,read-only=on,driver=vvfat,dir={seed},label=cidata"]
        with timed("cloud-init VM: boot to SSH"):
            vm4.start()
            vm4.wait_ssh()
        with timed("cloud-init VM: first-boot onboarding (ztmesh-pull.service)"):
            deadline = time.monotonic() + ONBOARD_TIMEOUT
            while time.monotonic() < deadline:
                show = vm4.ssh("systemctl show -p ActiveState -p ExecMainExitTimestampMonotonic "
                               "ztmesh-pull.service", check=False).stdout
                props = dict(line.split("=", 1) for line in show.split() if "=" in line)
                if props.get("ExecMainExitTimestampMonotonic", "0") != "0" and \
                        props.get("ActiveState") in ("inactive", "failed"):
                    break
                time.sleep(10)
        pull = vm4.ssh("journalctl -u ztmesh-pull -b --no-pager -o cat", check=False).stdout
        (LOGS / "cloud-init-ztmesh-pull.log").write_text(pull)
        cloud = vm4.ssh("cat /var/log/cloud-init-output.log", check=False).stdout
        (LOGS / "cloud-init-output.log").write_text(cloud)
        result = vm4.ssh("systemctl show -p Result --value ztmesh-pull.service", check=False).stdout.strip()
        assert result == "success", (f"the first-boot onboarding did not succeed ({result}); ztmesh-pull:\n"
                                     f"{pull[-5000:]}\ncloud-init:\n{cloud[-2000:]}\n{vm4.console_tail()}")
        hosts = recap(pull)
        assert hosts.get("vm4", {}).get("failed", 1) == 0, pull[-3000:]
        assert "geneve id" in vm4.ssh("ip -d link show istioin").stdout

        # Through the mesh, both ways, with both identities on the receiving side.
        serve(vm2, "web@vm2")
        got = fetch(vm4, f"http://{vm2.address}:8080/whoami")
        assert got.returncode == 0 and got.stdout.strip() == "web@vm2", got.stdout + got.stderr
        serve(vm4, "app-vm4@vm4")
        back = fetch(vm1, f"http://{vm4.address}:8080/whoami")
        assert back.returncode == 0 and back.stdout.strip() == "app-vm4@vm4", back.stdout + back.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (access_lines(journal(vm2), "app-vm4", "web")
                                                   and access_lines(journal(vm4), "client", "app-vm4")):
            time.sleep(2)
        assert access_lines(journal(vm2), "app-vm4", "web"), journal(vm2)[-3000:]
        assert access_lines(journal(vm4), "client", "app-vm4"), journal(vm4)[-3000:]
        fleet.passed.add("cloud-init")
    finally:
        server.terminate()
        server.wait(timeout=10)
