"""examples/cloud-init/user-data.yaml: valid cloud-config that fetches nothing but the controller's
bundle (no packages, no git, no pip), a shell script that parses and runs this repository's mesh.yml
for the VM only from the bundle, in the air-gapped mode, systemd units with what they need, and the
bundle builder. The VM tier boots the file for real (tests/vm/test_vm_cloud_init.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
USER_DATA = REPO / "examples" / "cloud-init" / "user-data.yaml"
BUILD_BUNDLE = REPO / "examples" / "cloud-init" / "build-bundle.sh"
PLACEHOLDERS = ("REPLACE-WITH-THE-BUNDLE-URL", "REPLACE-WITH-THE-BUNDLE-SHA256",
                "REPLACE-WITH-THE-ENROLLMENT-KEY", "REPLACE-WITH-THE-CA-HOST-KEY")


def files() -> dict:
    data = yaml.safe_load(USER_DATA.read_text())
    return {entry["path"]: entry for entry in data["write_files"]}


def test_user_data_is_cloud_config_and_installs_nothing_from_a_mirror() -> None:
    text = USER_DATA.read_text()
    assert text.startswith("#cloud-config\n"), "cloud-init only reads user-data starting with #cloud-config"
    data = yaml.safe_load(text)
    assert {"write_files", "runcmd"} <= set(data)
    # Air-gapped: no package installation, no package index update, no apt sources.
    assert not {"packages", "package_update", "package_upgrade", "apt"} & set(data)


def test_placeholders_are_documented_and_used() -> None:
    text = USER_DATA.read_text()
    header, _, body = text.partition("\nwrite_files:")
    for placeholder in PLACEHOLDERS:
        assert placeholder in header, f"{placeholder} is not documented in the header"
        assert placeholder in body, f"{placeholder} is documented but not used"
    assert set(re.findall(r"REPLACE-WITH-[A-Z0-9-]+", body)) == set(PLACEHOLDERS)


def test_pull_script_parses_and_runs_mesh_yml_from_the_bundle_for_this_node_only() -> None:
    script = files()["/usr/local/sbin/ztmesh-pull"]
    assert script["permissions"] == "0755"
    content = script["content"]
    assert content.startswith("#!/bin/sh\n")
    proc = subprocess.run([shutil.which("sh"), "-n"], input=content, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "playbooks/mesh.yml" in content and (REPO / "playbooks" / "mesh.yml").is_file()
    assert '--limit "$NODE"' in content and "--connection local" in content
    assert "ztmesh_package_source=controller" in content and "ztmesh_package_dir=" in content
    assert "sha256sum -c" in content
    # Nothing but the bundle is downloaded: no git, pip, apt, curl or wget.
    for word in ("git ", "pip ", "apt-get", "apt ", "curl", "wget", "ansible-pull"):
        assert word not in content, f"the pull script uses {word.strip()}"


def test_units_and_secrets() -> None:
    entries = files()
    service = entries["/etc/systemd/system/ztmesh-pull.service"]["content"]
    timer = entries["/etc/systemd/system/ztmesh-pull.timer"]["content"]
    assert "Type=oneshot" in service and "ExecStart=/usr/local/sbin/ztmesh-pull" in service
    assert "OnUnitActiveSec=" in timer and "WantedBy=timers.target" in timer
    # The enrollment key and the settings are readable by root only.
    assert entries["/etc/ztmesh-pull/enroll_key"]["permissions"] == "0600"
    assert entries["/etc/ztmesh-pull/pull.env"]["permissions"] == "0600"
    runcmd = yaml.safe_load(USER_DATA.read_text())["runcmd"]
    assert ["systemctl", "enable", "--now", "ztmesh-pull.timer"] in runcmd


def test_bundle_builder_parses_and_names_its_contents() -> None:
    proc = subprocess.run(["bash", "-n", str(BUILD_BUNDLE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = BUILD_BUNDLE.read_text()
    for part in ("wheelhouse.py", "fetch-node-packages.sh", "ansible-core==", "run-playbook",
                 "inventory.yml"):
        assert part in text
    # The pull script runs what the bundle builder writes.
    content = files()["/usr/local/sbin/ztmesh-pull"]["content"]
    assert "bundle/ansible/run-playbook" in content and "bundle/inventory.yml" in content
    assert "bundle/packages" in content
