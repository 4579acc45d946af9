"""Mesh state integrity (issue 13, defect 9): an empty mesh state file, or one cut short (at an entry
boundary it is still valid YAML), is refused and the last good state stays in force.

Both sides of the format are exercised: the renderer the role uses (module_utils/
ztmesh_mesh_state.py, through Ansible itself) and ztproxy's readers (ztproxy/state.py for the proxy,
ztproxy/identity/meshstate.py for the signing service), then the attack against a running proxy: its
mesh state is replaced by an empty file and by a truncated one while a peer opens HBONE streams."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml
from proxy_harness import EchoServer, H2TunnelClient, MeshFiles, ProxyThread, client_tls_context, workload

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_inventory as inventory
from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_mesh_state as renderer
from ztproxy import meshseal
from ztproxy.identity.meshstate import parse_placements
from ztproxy.state import MeshStateError, load_mesh_state, parse_mesh_state_bytes

REPO = Path(__file__).resolve().parents[2]




def example_fleet() -> Dict[str, Any]:
    data = yaml.safe_load((REPO / "playbooks/inventory/example.yml").read_text())
    group = data["all"]["children"]["ztmesh_nodes"]
    hostvars = {host: {**copy.deepcopy(group["vars"]), **copy.deepcopy(hv)}
                for host, hv in group["hosts"].items()}
    fleet = inventory.build_fleet(hostvars, list(hostvars))
    assert fleet["errors"] == []
    return fleet


def test_the_rendered_file_is_sealed_and_both_readers_accept_it() -> None:
    text = renderer.mesh_state_file(example_fleet())
    raw = text.encode()
    lines = text.splitlines()
    assert lines[0].startswith(meshseal.SEAL_HEADER) and lines[-1].startswith(meshseal.SEAL_TRAILER)
    expected = meshseal.verify(raw)
    state = parse_mesh_state_bytes(raw, "cluster.local")
    assert expected == {"workloads": len(state.workloads), "services": len(state.services),
                        "policies": len(state.policies)}
    assert expected["workloads"] >= 4 and expected["services"] >= 1 and expected["policies"] >= 1
    assert set(parse_placements(text, "cluster.local")) == {"node1", "node2", "node3"}
    # Deterministic: the role's copy task reports no change for an unchanged inventory.
    assert renderer.mesh_state_file(example_fleet()) == text


def test_every_prefix_of_a_sealed_file_is_refused_by_both_readers() -> None:
    raw = renderer.mesh_state_file(example_fleet()).encode()
    line_ends = [i + 1 for i, byte in enumerate(raw) if byte == ord("\n")]
    cuts = sorted(set(line_ends[:-1]) | set(range(0, len(raw), 97)) | {0, 1, len(raw) - 1})
    # Line boundaries are where a cut leaves valid YAML with fewer entries: the dangerous case.
    valid_yaml_cuts = 0
    for cut in cuts:
        prefix = raw[:cut]
        if cut == len(raw) - 1:  # only the final newline missing: the content is whole
            parse_mesh_state_bytes(prefix, "cluster.local")
            continue
        with pytest.raises(MeshStateError, match="refused|empty"):
            parse_mesh_state_bytes(prefix, "cluster.local")
        with pytest.raises(MeshStateError):
            parse_placements(prefix.decode(), "cluster.local")
        try:
            if yaml.safe_load(prefix.decode()) is not None:
                valid_yaml_cuts += 1
        except yaml.YAMLError:
            pass
    assert valid_yaml_cuts > 20, "the test should cut where the YAML alone still parses"


def test_a_changed_or_extended_sealed_file_is_refused() -> None:
    text = renderer.mesh_state_file(example_fleet())
    edited = text.replace("10.20.0.11", "10.20.0.99", 1)
    appended = text + "# edited by hand\n"
    one_entry_less = text.replace("workloads=", "workloads=9", 1)  # seal no longer matches the document
    for bad, reason in ((edited, "does not match its seal"), (appended, "does not end with"),
                        (one_entry_less, "does not match its seal|fewer or more")):
        with pytest.raises(MeshStateError, match=reason):
            parse_mesh_state_bytes(bad.encode(), "cluster.local")


def test_hand_written_files_stay_accepted_but_an_empty_one_never() -> None:
    hand = b"workloads:\n- {name: a, namespace: x, workloadIps: [10.0.0.1], node: n1}\n"
    assert len(parse_mesh_state_bytes(hand, "cluster.local").workloads) == 1
    assert parse_mesh_state_bytes(b"workloads: []\n", "cluster.local").workloads == []
    for empty in (b"", b"\n", b"# nothing\n", b"---\n"):
        with pytest.raises(MeshStateError, match="empty"):
            parse_mesh_state_bytes(empty, "cluster.local")
        with pytest.raises(MeshStateError, match="empty"):
            parse_placements(empty.decode(), "cluster.local")
    # The helper the tests and tools use writes the format the renderer writes.
    sealed = meshseal.seal(hand.decode())
    assert meshseal.verify(sealed.encode()) == {"workloads": 1, "services": 0, "policies": 0}


@pytest.mark.timeout(180)
def test_ansible_writes_a_sealed_file_that_ztproxy_validates(tmp_path: Path) -> None:
    """The role itself, run by ansible-playbook on localhost: copy's validate step runs ztproxy's loader
    on the new file, as on a node."""
    dest = tmp_path / "mesh-state.yaml"
    hostvars = yaml.safe_load((REPO / "playbooks/inventory/example.yml").read_text())
    group = hostvars["all"]["children"]["ztmesh_nodes"]
    playbook = tmp_path / "write-state.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Write the mesh state as the role does",
        "hosts": "localhost",
        "gather_facts": False,
        "vars": {"example": group},
        "tasks": [
            {"name": "Normalize the example inventory",
             "ansible.builtin.set_fact": {"ztmesh_fleet": (
                 "{{ {'node1': example.vars | combine(example.hosts.node1),"
                 " 'node2': example.vars | combine(example.hosts.node2),"
                 " 'node3': example.vars | combine(example.hosts.node3)}"
                 " | ztmesh.mesh.ztmesh_fleet(['node1', 'node2', 'node3']) }}")}},
            {"name": "Run the role", "ansible.builtin.include_role": {"name": "ztmesh.mesh.ztmesh_state"},
             "vars": {"ztmesh_mesh_state_path": str(dest),
                      "ztmesh_deny_list_path": str(tmp_path / "deny.yaml"),
                      "ztmesh_proxy_group": "root", "ztmesh_state_validate_python": sys.executable}},
        ],
    }]))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               PYTHONPATH=str(REPO))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,",
                           "-c", "local", str(playbook)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = dest.read_bytes()
    assert meshseal.verify(raw) is not None
    assert raw == renderer.mesh_state_file(example_fleet()).encode()
    assert len(load_mesh_state(str(dest), "cluster.local").workloads) == meshseal.verify(raw)["workloads"]


SERVER_IP, CLIENT_IP = "127.0.0.3", "127.0.0.2"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.timeout(60)
def test_a_running_proxy_keeps_its_last_good_state(tmp_path: Path, caplog) -> None:
    """The attack of the review: the proxy's mesh state becomes empty, then is cut at an entry boundary
    (the local workload's entry lost). Before the fix each was loaded and the HBONE handshake to the
    workload was reset (no local workload, no certificate to present): ['ConnectionResetError'] twice;
    on the outbound side traffic to it went out as plaintext passthrough."""
    files = MeshFiles(tmp_path / "mesh")
    files.install("default", "server")
    document = yaml.safe_dump({"workloads": [workload("client", CLIENT_IP, "node-b"),
                                             workload("server", SERVER_IP, "node-a")],
                               "services": [], "policies": []}, sort_keys=True)
    sealed = meshseal.seal(document).encode()
    _write(files.state_path, sealed)
    cut = sealed[:sealed.index(b"- name: server") if b"- name: server" in sealed
                 else sealed.rindex(b"\n- ") + 1]
    assert yaml.safe_load(cut.decode())["workloads"], "the cut must leave valid YAML with fewer workloads"
    echo = EchoServer(SERVER_IP)
    statuses = []
    try:
        with ProxyThread(files.settings(reload_interval=0.1)) as app:
            for attack in (b"", cut):
                _write(files.state_path, attack)
                time.sleep(0.6)  # several reload intervals
                ctx = client_tls_context(files.issue("default", "client"), files.bundle, tmp_path)
                try:
                    client = H2TunnelClient((SERVER_IP, app.port("inbound")), ctx)
                    sid = client.connect(f"{SERVER_IP}:{echo.address[1]}")
                    statuses.append(client.wait_status(sid))
                except OSError as exc:  # with no local workload left, the handshake itself is reset
                    statuses.append(type(exc).__name__)
                    continue
                if statuses[-1] == 200:
                    client.send(sid, b"still in the mesh", end_stream=True)
                    client.wait(lambda sid=sid, client=client: client.ended.get(sid))
                    assert bytes(client.data[sid]) == b"still in the mesh"
                client.close()
            assert len(app.proxy.state.workloads) == 2
    finally:
        echo.close()
    assert statuses == [200, 200], statuses
