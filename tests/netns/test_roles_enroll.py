"""roles/ztmesh_ca and roles/ztmesh_workloads for real, through ansible-playbook with a local
connection: a CA is created, the node's identities are enrolled (keys made where the role runs, CSRs
signed by the CA), a second run changes nothing, check mode reports without changing, and an identity
taken out of the inventory is removed. Files only (a temporary certs dir); the proxy's own loader must
accept what was installed. In this tier because it runs several full playbooks (slow for unit)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from ztproxy.certs import IdentityFiles, load_trust_bundle, validate_identity

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- ansible.builtin.import_playbook: {repo}/playbooks/validate.yml
- name: Enroll
  hosts: ztmesh_nodes
  gather_facts: false
  tasks:
    - ansible.builtin.include_role: {{name: ztmesh.mesh.ztmesh_ca}}
    - ansible.builtin.include_role: {{name: ztmesh.mesh.ztmesh_workloads}}
"""


def write_inventory(tmp: Path, workloads: List[dict]) -> Path:
    user = pwd.getpwuid(os.getuid()).pw_name
    inventory = {"all": {"children": {"ztmesh_nodes": {
        "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "ztmesh_ca_dir": str(tmp / "ca"),
            "ztmesh_certs_dir": str(tmp / "certs"),
            "ztmesh_trust_bundle": str(tmp / "certs" / "root-cert.pem"),
            "ztmesh_proxy_user": user,
            "ztmesh_proxy_group": user,
        },
        "hosts": {"vm1": {"ztmesh_workloads": workloads}},
    }}}}
    path = tmp / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def run_playbook(tmp: Path, inventory: Path, *extra: str) -> Dict[str, int]:
    """Run the enrollment playbook; returns the host's stats (changed, failures, ...)."""
    # Inside playbooks/ so that the playbook-adjacent filter plugins are found, as for mesh.yml.
    playbook = REPO / "playbooks" / f".test-enroll-{os.getpid()}.yml"
    playbook.write_text(PLAYBOOK.format(repo=REPO))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="json")
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                               str(playbook), *extra], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=300)
    finally:
        playbook.unlink()
    try:
        stats = json.loads(proc.stdout)["stats"]["vm1"]
    except (ValueError, KeyError) as exc:
        raise AssertionError(f"no result: rc={proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr}") from exc
    assert stats["failures"] == 0 and stats["unreachable"] == 0, proc.stdout[-6000:]
    return stats


def tree_digest(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


WEB = {"name": "web", "addresses": ["10.0.0.11"], "namespace": "shop", "service_account": "web"}
DB = {"name": "db", "kind": "contained", "addresses": ["10.244.0.5"], "namespace": "shop",
      "service_account": "db"}


@pytest.mark.timeout(900)
def test_enrollment_is_idempotent_check_mode_safe_and_follows_the_inventory(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, [WEB, DB])
    certs = tmp_path / "certs"

    # Check mode on a fresh node: changes reported, nothing written on the node.
    stats = run_playbook(tmp_path, inventory, "--check", "--diff")
    assert stats["changed"] > 0
    assert not certs.exists() or not any(certs.rglob("*.pem"))

    stats = run_playbook(tmp_path, inventory)
    assert stats["changed"] > 0
    roots = load_trust_bundle(str(certs / "root-cert.pem"))
    assert len(roots) == 1
    for namespace, account in (("shop", "web"), ("shop", "db"), ("ztmesh-system", "node-vm1")):
        files = IdentityFiles.under(str(certs), namespace, account)
        validate_identity(files, str(certs / "root-cert.pem"),
                          f"spiffe://cluster.local/ns/{namespace}/sa/{account}")
        assert (os.stat(files.key).st_mode & 0o777) == 0o600
    before = tree_digest(certs)

    # Second run and check mode on the converged node: nothing changes.
    assert run_playbook(tmp_path, inventory)["changed"] == 0
    assert run_playbook(tmp_path, inventory, "--check", "--diff")["changed"] == 0
    assert tree_digest(certs) == before

    # The db workload leaves the node: its identity goes, the others stay untouched.
    inventory = write_inventory(tmp_path, [WEB])
    assert run_playbook(tmp_path, inventory)["changed"] > 0
    assert not (certs / "shop" / "db").exists()
    after = tree_digest(certs)
    assert {k: v for k, v in before.items() if not k.startswith("shop/db")} == after
