"""The Ansible content as the collection ztmesh.mesh, built and installed the way a user does it.

scripts/build-collection.sh builds the artifact with ansible-galaxy from this checkout; ansible-galaxy
installs it into a temporary collections path; then, from another directory, with no ansible.cfg of
the repository and nothing of the checkout on Python's path, every playbook of the installed
collection passes Ansible's syntax check, validate.yml checks an inventory (filters, the inventory
model in module_utils, the roles' argument specs, all from the installed copy), ansible-doc renders a
module and a playbook runs one of its modules against localhost in check mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p.stem for p in (REPO / "playbooks").glob("*.yml"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("collection")
    dist, collections, elsewhere = root / "dist", root / "collections", root / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    build = subprocess.run([str(REPO / "scripts" / "build-collection.sh"), str(dist)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    artifacts = sorted(dist.glob("ztmesh-mesh-*.tar.gz"))
    assert len(artifacts) == 1, artifacts
    install = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(artifacts[0]),
                              "-p", str(collections)],
                             capture_output=True, text=True, cwd=elsewhere, env=_env(root, collections),
                             timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return {"root": root, "artifact": artifacts[0], "collections": collections, "elsewhere": elsewhere,
            "path": collections / "ansible_collections" / "ztmesh" / "mesh"}


def _env(root: Path, collections: Path) -> Dict[str, str]:
    """Another user's environment: an empty ansible.cfg, only the installed collections, no checkout on
    Python's path (the checkout's ansible_collections would otherwise be found there)."""
    config = root / "ansible.cfg"
    config.write_text("[defaults]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "PYTHONPATH"}
    env.update(ANSIBLE_CONFIG=str(config), ANSIBLE_COLLECTIONS_PATH=str(collections),
               ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false", ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
               ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_HOME=str(root / "ansible-home"))
    return env


def _run(installed: Dict[str, Path], *argv: str, timeout: int = 170) -> subprocess.CompletedProcess:
    return subprocess.run([*argv], capture_output=True, text=True, cwd=installed["elsewhere"],
                          env=_env(installed["root"], installed["collections"]), timeout=timeout)


@pytest.mark.timeout(600)
def test_the_artifact_holds_the_collection(installed) -> None:
    with tarfile.open(installed["artifact"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        manifest = json.loads(tar.extractfile("MANIFEST.json").read())
    assert not [m for m in members.values() if m.issym() or m.islnk()], "the artifact has links"
    galaxy = yaml.safe_load((REPO / "ansible_collections/ztmesh/mesh/galaxy.yml").read_text())
    assert manifest["collection_info"]["version"] == galaxy["version"]
    for module in (REPO / "modules").glob("ztmesh_*.py"):
        assert f"plugins/modules/{module.name}" in members
    for util in (REPO / "module_utils").glob("ztmesh_*.py"):
        assert f"plugins/module_utils/{util.name}" in members
    for plugin in (REPO / "filter_plugins").glob("*.py"):
        assert f"plugins/filter/{plugin.name}" in members
    for role in (REPO / "roles").iterdir():
        assert f"roles/{role.name}/meta/argument_specs.yml" in members
    for playbook in PLAYBOOKS:
        assert f"playbooks/{playbook}.yml" in members
    # The ztproxy role builds its wheel from the collection's own copy of the source.
    assert "pyproject.toml" in members and "ztproxy/__init__.py" in members
    assert not [name for name in members if "__pycache__" in name or name.startswith((".", "tests/"))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_installed_playbook_syntax_from_another_directory(installed, playbook: str) -> None:
    # ztmesh.mesh.mesh; a name with '-' (ca-rotate, refresh-state) is no valid collection resource name:
    # those run by their path in the installed collection.
    name = (f"ztmesh.mesh.{playbook}" if playbook.isidentifier()
            else str(installed["path"] / "playbooks" / f"{playbook}.yml"))
    proc = _run(installed, str(BIN / "ansible-playbook"), "-i", "localhost,", "--syntax-check", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(600)
def test_installed_validate_checks_an_inventory(installed) -> None:
    """The filters, the inventory model and the roles' argument specs of the installed copy."""
    inventory = installed["root"] / "inventory.yml"
    hosts = {"n1": {"ansible_connection": "local",
                    "ztmesh_workloads": [{"name": "web", "addresses": ["10.0.0.1"]}]}}
    inventory.write_text(yaml.safe_dump({"all": {"children": {"ztmesh_nodes": {"hosts": hosts}}}}))
    good = _run(installed, str(BIN / "ansible-playbook"), "-i", str(inventory), "ztmesh.mesh.validate")
    assert good.returncode == 0, good.stdout + good.stderr
    hosts["n1"]["ztproxy_netns"] = "proxy2"  # a former name of ztmesh_proxy_netns
    inventory.write_text(yaml.safe_dump({"all": {"children": {"ztmesh_nodes": {"hosts": hosts}}}}))
    bad = _run(installed, str(BIN / "ansible-playbook"), "-i", str(inventory), "ztmesh.mesh.validate")
    assert bad.returncode != 0
    assert "ztproxy_netns" in bad.stdout and "ztmesh_proxy_netns" in bad.stdout, bad.stdout


@pytest.mark.timeout(600)
def test_installed_module_docs_and_check_mode_run(installed) -> None:
    doc = _run(installed, str(BIN / "ansible-doc"), "--json", "ztmesh.mesh.ztmesh_tunnel")
    assert doc.returncode == 0, doc.stderr
    rendered = json.loads(doc.stdout)["ztmesh.mesh.ztmesh_tunnel"]["doc"]
    assert Path(rendered["filename"]).resolve().is_relative_to(installed["collections"].resolve())

    ca_dir = installed["root"] / "ca"
    playbook = installed["elsewhere"] / "ca.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "A module of the installed collection in check mode",
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [{"name": "Create a mesh CA", "ztmesh.mesh.ztmesh_ca": {"ca_dir": str(ca_dir)},
                   "register": "ca"},
                  {"name": "Check it would change", "ansible.builtin.assert": {"that": ["ca is changed"]}}],
    }]))
    proc = _run(installed, str(BIN / "ansible-playbook"), "-i", "localhost,", "--check", str(playbook))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not ca_dir.exists(), "check mode created the CA"
