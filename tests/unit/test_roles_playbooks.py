"""Static checks of the roles and playbooks: every playbook passes Ansible's syntax check, every role
declares its variables in meta/argument_specs.yml, a value the roles share has one definition
(roles/ztmesh_common) that agrees with ztproxy's own defaults, and the ztproxy unit is hardened as
documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_inventory as inventory
from ztproxy import config as ztproxy_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p for p in (REPO / "playbooks").glob("*.yml"))
ROLES = sorted(p for p in (REPO / "roles").iterdir() if p.is_dir())
# Roles of this part of the project: every default must be declared in the argument spec.
OWN_ROLES = ("ztmesh_ca", "ztproxy", "ztmesh_workloads", "ztmesh_state", "ztmesh_common")


def _env() -> Dict[str, str]:
    return dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                ANSIBLE_PYTHON_INTERPRETER=sys.executable)


def _defaults(role: str) -> dict:
    return yaml.safe_load((REPO / "roles" / role / "defaults/main.yml").read_text()) or {}


def _vars(role: str) -> dict:
    path = REPO / "roles" / role / "vars/main.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


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


SHARED = tuple(_defaults("ztmesh_common"))


def test_the_shared_paths_agree_with_ztproxy() -> None:
    """roles/ztmesh_common defines the values the roles share; ztproxy's own defaults
    (ztproxy/config.py) are the reference for the file locations."""
    common = _defaults("ztmesh_common")
    assert common["ztmesh_mesh_state_path"] == ztproxy_config.DEFAULT_MESH_STATE
    assert common["ztmesh_certs_dir"] == ztproxy_config.DEFAULT_CERTS_DIR
    trust_bundle = common["ztmesh_trust_bundle"].replace("{{ ztmesh_certs_dir }}", common["ztmesh_certs_dir"])
    assert trust_bundle == ztproxy_config.DEFAULT_TRUST_BUNDLE
    assert _defaults("ztmesh_state")["ztmesh_state_validate_python"] == "{{ ztmesh_runtime_dir }}/bin/python"


@pytest.mark.parametrize("role", [r.name for r in ROLES if r.name != "ztmesh_common"])
def test_a_shared_value_has_one_definition(role: str) -> None:
    """No role defines or declares a shared value again (a second default could disagree with the
    first), and every role depends on roles/ztmesh_common, so each sees the one definition."""
    again = set(SHARED) & (set(_defaults(role)) | set(_vars(role)))
    assert not again, f"{role} defines shared values again: {sorted(again)} (only in roles/ztmesh_common)"
    specs = yaml.safe_load((REPO / "roles" / role / "meta/argument_specs.yml").read_text())["argument_specs"]
    for entry, spec in specs.items():
        declared = set(SHARED) & set(spec.get("options") or {})
        assert not declared, f"{role} {entry}: declares {sorted(declared)} (declared in roles/ztmesh_common)"
    meta = yaml.safe_load((REPO / "roles" / role / "meta/main.yml").read_text())
    assert {"role": "ztmesh.mesh.ztmesh_common"} in (meta.get("dependencies") or []), role


def test_a_former_name_of_a_shared_value_is_refused() -> None:
    """An inventory that sets an old per-role name (e.g. ztproxy_netns) would move one role and not
    the other: the inventory check refuses it and names the variable to use."""
    assert set(inventory.RENAMED_VARIABLES.values()) <= set(SHARED)
    assert not set(inventory.RENAMED_VARIABLES) & inventory.known_variables()
    hostvars = {"n1": {"ztproxy_netns": "proxy2"}}
    fleet = inventory.build_fleet(hostvars, ["n1"])
    assert any("ztproxy_netns" in e and "ztmesh_proxy_netns" in e for e in fleet["errors"]), fleet["errors"]


@pytest.mark.timeout(120)
def test_ztproxy_unit_is_hardened() -> None:
    """Render the unit template with the role defaults through Ansible and read its directives."""
    role = REPO / "roles/ztproxy"
    extra = dict(_defaults("ztmesh_common"), **_defaults("ztproxy"), role_path=str(role),
                 ansible_managed="managed")
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
