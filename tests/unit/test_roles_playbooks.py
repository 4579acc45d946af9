"""Static checks of the roles and playbooks: every playbook passes Ansible's syntax check, every role
declares its variables in meta/argument_specs.yml, the paths the roles share agree with ztproxy's
own defaults, and the ztproxy unit is hardened as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml

from ztproxy import config as ztproxy_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p for p in (REPO / "playbooks").glob("*.yml"))
ROLES = sorted(p for p in (REPO / "roles").iterdir() if p.is_dir())
# Roles of this part of the project: every default must be declared in the argument spec.
OWN_ROLES = ("ztmesh_ca", "ztproxy", "ztmesh_workloads", "ztmesh_state")


def _env() -> Dict[str, str]:
    return dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                ANSIBLE_PYTHON_INTERPRETER=sys.executable)


def _defaults(role: str) -> dict:
    return yaml.safe_load((REPO / "roles" / role / "defaults/main.yml").read_text()) or {}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=[p.name for p in PLAYBOOKS])
def test_playbook_syntax(playbook: Path) -> None:
    proc = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", str(playbook)],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_main_playbooks_exist() -> None:
    names = {p.name for p in PLAYBOOKS}
    assert {"mesh.yml", "uninstall.yml", "refresh-state.yml", "validate.yml"} <= names


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_every_role_has_an_argument_spec(role: Path) -> None:
    spec_file = role / "meta" / "argument_specs.yml"
    assert spec_file.is_file(), f"{role.name} has no meta/argument_specs.yml"
    specs = yaml.safe_load(spec_file.read_text())["argument_specs"]
    assert "main" in specs and specs["main"].get("options"), f"{role.name}: no options in entry point main"


@pytest.mark.parametrize("role", OWN_ROLES)
def test_every_default_is_declared_in_the_argument_spec(role: str) -> None:
    specs = yaml.safe_load((REPO / "roles" / role / "meta/argument_specs.yml").read_text())["argument_specs"]
    declared = set(specs["main"]["options"])
    for entry, spec in specs.items():
        for name, option in spec.get("options", {}).items():
            assert option.get("description"), f"{role}: {entry}.{name} has no description"
            assert "default" not in option, f"{role}: {entry}.{name}: defaults belong in defaults/main.yml"
    missing = set(_defaults(role)) - declared
    assert not missing, f"{role}: defaults not declared in meta/argument_specs.yml: {sorted(missing)}"


def test_the_roles_agree_on_ztproxy_paths() -> None:
    proxy, state, workloads = _defaults("ztproxy"), _defaults("ztmesh_state"), _defaults("ztmesh_workloads")
    # ztproxy's own defaults (ztproxy/config.py) are the reference for the file locations.
    assert proxy["ztproxy_config_dir"] + "/mesh-state.yaml" == ztproxy_config.DEFAULT_MESH_STATE
    assert state["ztmesh_state_file"] == ztproxy_config.DEFAULT_MESH_STATE
    assert state["ztmesh_state_deny_list_file"] == proxy["ztproxy_config_dir"] + "/deny-list.yaml"
    assert proxy["ztproxy_state_dir"] + "/certs" == ztproxy_config.DEFAULT_CERTS_DIR
    assert workloads["ztmesh_workloads_certs_dir"] == ztproxy_config.DEFAULT_CERTS_DIR
    assert workloads["ztmesh_workloads_trust_bundle"] == ztproxy_config.DEFAULT_TRUST_BUNDLE
    assert state["ztmesh_state_group"] == proxy["ztproxy_group"] == workloads["ztmesh_workloads_group"]
    assert workloads["ztmesh_workloads_owner"] == proxy["ztproxy_user"]
    assert state["ztmesh_state_validate_python"] == proxy["ztproxy_install_dir"] + "/venv/bin/python"
    node = _defaults("ztmesh_node")
    assert node["ztmesh_proxy_netns"] == proxy["ztproxy_netns"]
    assert node["ztmesh_dataplane_unit_name"] == proxy["ztproxy_dataplane_unit"]
    assert node["ztmesh_proxy_service"] == proxy["ztproxy_unit"]


@pytest.mark.timeout(120)
def test_ztproxy_unit_is_hardened() -> None:
    """Render the unit template with the role defaults through Ansible and read its directives."""
    role = REPO / "roles/ztproxy"
    extra = dict(_defaults("ztproxy"), role_path=str(role), ansible_managed="managed")
    argv = [str(BIN / "ansible"), "localhost", "-i", "localhost,", "-c", "local",
            "-m", "ansible.builtin.debug",
            "-a", f"msg={{{{ lookup('ansible.builtin.template', '{role}/templates/ztproxy.service.j2') }}}}",
            "-e", json.dumps(extra)]
    env = dict(_env(), ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="json")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unit = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]["msg"]
    directives: Dict[str, str] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            directives[key] = value
    assert directives["NetworkNamespacePath"] == "/run/netns/ztproxy"
    assert directives["User"] == "ztproxy" and directives["Group"] == "ztproxy"
    assert set(directives["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(directives["AmbientCapabilities"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert directives["NoNewPrivileges"] == "yes"
    assert directives["ProtectSystem"] == "strict"
    assert directives["ReadWritePaths"] == "/var/lib/ztproxy"
    assert directives["Requires"] == "ztmesh-dataplane.service"
    assert "ztmesh-dataplane.service" in directives["After"].split()
    assert directives["Restart"] == "on-failure"
    assert directives["ExecStart"] == "/opt/ztmesh/venv/bin/ztproxy run --config /etc/ztproxy/ztproxy.yaml"
