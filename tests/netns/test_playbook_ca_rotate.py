"""playbooks/ca-rotate.yml run for real by ansible-playbook: two nodes and a signing-service host (all
local connections, each with its own directories), phase by phase, with the refusal of phase 3 while
old certificates remain and the idempotence of phase 2."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml

from ztproxy.identity import pki

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "playbooks" / "ca-rotate.yml"
WORKLOADS = {
    "n1": [{"name": "web", "namespace": "shop", "service_account": "web"}],
    "n2": [
        {"name": "db", "namespace": "shop", "service_account": "db"},
        {"name": "db2", "namespace": "shop", "service_account": "db"},
    ],
}

pytestmark = pytest.mark.timeout(600)


def identities(node: str):
    ids = {pki.node_identity("cluster.local", node)}
    ids |= {pki.SpiffeId.of("cluster.local", w["namespace"], w["service_account"]) for w in WORKLOADS[node]}
    return ids


def install(certs: Path, identity: pki.SpiffeId, ca: pki.CaMaterial) -> None:
    key = pki.generate_key()
    leaf = pki.issue_leaf(ca, key.public_key(), identity, 3600)
    directory = Path(pki.identity_dir(str(certs), identity))
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_file(str(directory / "key.pem"), pki.key_pem(key), 0o600)
    pki.write_file(str(directory / "cert-chain.pem"), pki.certs_pem([leaf] + ca.chain), 0o644)


def run_playbook(tmp: Path, inventory: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
    )
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(inventory),
            str(PLAYBOOK),
            "-e",
            f"ztmesh_ca_dir={tmp / 'ca-old'}",
            "-e",
            f"ztmesh_ca_new_dir={tmp / 'ca-new'}",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def recap(output: str) -> Dict[str, Dict[str, int]]:
    found = {}
    for host, counters in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE):
        found[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
    return found


def roots(path: Path):
    return [pki.serial_hex(c) for c in pki.load_cert_file(str(path))]


def test_ca_rotate_playbook_phases(tmp_path: Path) -> None:
    old = pki.create_ca(str(tmp_path / "ca-old"))
    signer_dir = tmp_path / "signer-ca"
    signer_dir.mkdir()
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"):
        (signer_dir / name).write_text((tmp_path / "ca-old" / name).read_text())
    signer_bundle = tmp_path / "signer-bundle.pem"
    signer_bundle.write_text(old.roots_pem)
    hosts = {}
    for node in ("n1", "n2"):
        certs = tmp_path / node / "certs"
        for identity in identities(node):
            install(certs, identity, old)
        (certs / "root-cert.pem").write_text(old.roots_pem)
        hosts[node] = {
            "ztmesh_certs_dir": str(certs),
            "ztmesh_trust_bundle": str(certs / "root-cert.pem"),
            # The files' owner (the proxy's user on a real node): this machine has no user ztproxy.
            "ztmesh_proxy_user": "root",
            "ztmesh_proxy_group": "root",
            "ztmesh_workloads": WORKLOADS[node],
        }
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
                    "children": {
                        "ztmesh_nodes": {"hosts": hosts},
                        "ztmesh_ca_servers": {
                            "hosts": {
                                "signer1": {
                                    "ztmesh_ca_server_dir": str(signer_dir),
                                    "ztmesh_ca_server_trust_bundle": str(signer_bundle),
                                }
                            }
                        },
                    },
                }
            }
        )
    )
    old_root = pki.serial_hex(old.anchor)

    phase1 = run_playbook(tmp_path, inventory, "--tags", "phase1")
    assert phase1.returncode == 0, phase1.stdout[-4000:] + phase1.stderr[-2000:]
    new = pki.load_ca(str(tmp_path / "ca-new"))
    new_root = pki.serial_hex(new.anchor)
    for path in (tmp_path / "n1/certs/root-cert.pem", tmp_path / "n2/certs/root-cert.pem", signer_bundle):
        assert roots(path) == [new_root, old_root], path
    assert stat.S_IMODE((tmp_path / "ca-new" / "ca-key.pem").stat().st_mode) == 0o600

    # Phase 3 before phase 2: refused, nothing removed.
    early = run_playbook(tmp_path, inventory, "--tags", "phase3")
    assert early.returncode != 0 and "still need a certificate from the new CA" in early.stdout
    assert roots(tmp_path / "n1/certs/root-cert.pem") == [new_root, old_root]

    phase2 = run_playbook(tmp_path, inventory, "--tags", "phase2")
    assert phase2.returncode == 0, phase2.stdout[-4000:] + phase2.stderr[-2000:]
    for node in ("n1", "n2"):
        for identity in identities(node):
            directory = Path(pki.identity_dir(str(tmp_path / node / "certs"), identity))
            chain = pki.load_cert_file(str(directory / "cert-chain.pem"))
            assert pki.signed_by(chain[0], new.signing_cert), identity
            assert pki.key_matches_cert(pki.load_key_file(str(directory / "key.pem")), chain[0])
            assert not (directory / "key.pem.pending").exists()
    assert (signer_dir / "ca-cert.pem").read_text() == pki.cert_pem(new.signing_cert)
    assert stat.S_IMODE((signer_dir / "ca-key.pem").stat().st_mode) == 0o600
    assert pki.load_ca(str(signer_dir)).signing_cert == new.signing_cert
    assert "BEGIN PRIVATE KEY" not in phase2.stdout

    again = run_playbook(tmp_path, inventory, "--tags", "phase2")
    assert again.returncode == 0
    assert all(c["changed"] == 0 for c in recap(again.stdout).values()), again.stdout[-3000:]

    phase3 = run_playbook(tmp_path, inventory, "--tags", "phase3")
    assert phase3.returncode == 0, phase3.stdout[-4000:] + phase3.stderr[-2000:]
    for path in (tmp_path / "n1/certs/root-cert.pem", tmp_path / "n2/certs/root-cert.pem", signer_bundle):
        assert roots(path) == [new_root], path
