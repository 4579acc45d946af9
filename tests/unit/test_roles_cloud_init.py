"""examples/cloud-init/user-data.yaml: valid cloud-config, a shell script that parses, systemd units
with what they need, and an ansible-pull call that runs this repository's mesh.yml for the VM only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
USER_DATA = REPO / "examples" / "cloud-init" / "user-data.yaml"


def files() -> dict:
    data = yaml.safe_load(USER_DATA.read_text())
    return {entry["path"]: entry for entry in data["write_files"]}


def test_user_data_is_cloud_config() -> None:
    text = USER_DATA.read_text()
    assert text.startswith("#cloud-config\n"), "cloud-init only reads user-data starting with #cloud-config"
    data = yaml.safe_load(text)
    assert {"packages", "write_files", "runcmd"} <= set(data)
    assert {"git", "python3-venv"} <= set(data["packages"])


def test_pull_script_parses_and_runs_mesh_yml_for_this_node_only() -> None:
    script = files()["/usr/local/sbin/ztmesh-pull"]
    assert script["permissions"] == "0755"
    content = script["content"]
    assert content.startswith("#!/bin/sh\n")
    shell = shutil.which("sh")
    proc = subprocess.run([shell, "-n"], input=content, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ansible-pull" in content and "playbooks/mesh.yml" in content
    assert '--limit "$NODE"' in content and "--connection local" in content
    assert (REPO / "playbooks" / "mesh.yml").is_file()


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
