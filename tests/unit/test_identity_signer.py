"""The pieces of the signing service and the renewer that need no network: wire messages, mesh-state
placements, authorization decisions, backoff, and the `ca`/`cert` command lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from ztproxy.identity import grpcwire, pki
from ztproxy.identity.grpcwire import GrpcError
from ztproxy.identity.meshstate import MeshState, parse_placements
from ztproxy.identity.renewer import backoff_delay
from ztproxy.identity.signer import SignerSettings, SigningService
from ztproxy.state import MeshStateError

MESH = """
workloads:
  - name: web
    namespace: shop
    serviceAccount: web
    node: node1
    workloadIps: [10.0.0.1]
  - name: db
    namespace: shop
    serviceAccount: db
    node: node2
  - name: default-sa
    namespace: default
    node: node2
  - name: pod-in-kubernetes
    namespace: shop
    serviceAccount: cart
"""


def test_request_encoding_is_istios_wire_format() -> None:
    # Field 1 (csr, string) = tag 0x0a; field 2 (validity_duration, varint) = tag 0x10; 3600 = 0x90 0x1c.
    assert grpcwire.make_request("abc", 3600) == b"\x0a\x03abc\x10\x90\x1c"
    payload = grpcwire.make_request("abc", 60, "spiffe://cluster.local/ns/a/sa/b")
    # Field 3 is a google.protobuf.Struct: decode it with protobuf's own Struct type.
    assert payload[:7] == b"\x0a\x03abc\x10\x3c" and payload[7] == 0x1A
    struct = struct_pb2.Struct()
    struct.ParseFromString(payload[9:])
    assert struct.fields["ImpersonatedIdentity"].string_value == "spiffe://cluster.local/ns/a/sa/b"
    assert grpcwire.parse_request(payload) == (
        "abc",
        60,
        {"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"},
    )
    assert grpcwire.parse_response(grpcwire.make_response(["x", "y"])) == ["x", "y"]
    assert grpcwire.make_response(["x"]) == b"\x0a\x01x"


def test_grpc_framing() -> None:
    assert grpcwire.frame(b"hi") == b"\x00\x00\x00\x00\x02hi"
    assert grpcwire.unframe(b"\x00\x00\x00\x00\x02hi") == b"hi"
    with pytest.raises(GrpcError) as err:
        grpcwire.unframe(b"\x01\x00\x00\x00\x02hi")
    assert err.value.code == grpcwire.UNIMPLEMENTED
    with pytest.raises(GrpcError):
        grpcwire.unframe(b"\x00\x00\x00\x00\x05hi")
    assert (
        grpcwire.percent_decode(grpcwire.percent_encode("node n1 is not in the mesh state: 100%"))
        == "node n1 is not in the mesh state: 100%"
    )


def test_placements_follow_ztunnel_defaults() -> None:
    placements = parse_placements(MESH)
    ids = {node: sorted(str(i) for i in v) for node, v in placements.items()}
    assert ids == {
        "node1": ["spiffe://cluster.local/ns/shop/sa/web"],
        "node2": ["spiffe://cluster.local/ns/default/sa/default", "spiffe://cluster.local/ns/shop/sa/db"],
    }
    with pytest.raises(MeshStateError, match=r"workloads\[0\].*namespace"):
        parse_placements("workloads: [{name: x, node: n, namespace: 'a b'}]")
    with pytest.raises(MeshStateError, match="must be a list"):
        parse_placements("workloads: {a: 1}")
    # One parser for the signing service and the proxy, as strict for both: an unknown key, a missing
    # namespace or an invalid policy refuse the file in the signing service too.
    with pytest.raises(MeshStateError, match="unknown key"):
        parse_placements("workloads: [{name: x, node: n, namespace: a, serviceAcount: b}]")
    with pytest.raises(MeshStateError, match="namespace' is required"):
        parse_placements("workloads: [{name: x, node: n}]")
    with pytest.raises(MeshStateError, match="policies"):
        parse_placements("workloads: []\npolicies: [{name: p, namespace: a, action: Audit}]")


def test_mesh_state_reload_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    state = MeshState(str(path))
    assert state.has_node("node1")
    path.write_text("workloads: [\n")
    assert state.has_node("node1"), "an unparsable mesh state keeps the previous placements"
    path.write_text("workloads: []\n")
    assert not state.has_node("node1")
    with pytest.raises(MeshStateError, match="does not exist"):
        MeshState(str(tmp_path / "missing.yaml"))


@pytest.fixture
def service(tmp_path: Path) -> SigningService:
    pki.create_ca(str(tmp_path / "ca"))
    (tmp_path / "mesh.yaml").write_text(MESH)
    return SigningService(SignerSettings(ca_dir=str(tmp_path / "ca"), mesh_state=str(tmp_path / "mesh.yaml")))


def _code(call) -> int:
    with pytest.raises(GrpcError) as err:
        call()
    return err.value.code


def test_authorization_decisions(service: SigningService, tmp_path: Path) -> None:
    node1 = pki.node_identity("cluster.local", "node1")
    web = pki.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
    assert service.authorize(node1, str(web)) == web
    assert service.authorize(node1, None) == node1  # a node renews its own identity
    # A node may not obtain another node's workload identity, nor a pod's, nor another node identity.
    for foreign in (
        "spiffe://cluster.local/ns/shop/sa/db",
        "spiffe://cluster.local/ns/shop/sa/cart",
        "spiffe://cluster.local/ns/ztmesh-system/sa/node-node2",
    ):
        assert _code(lambda f=foreign: service.authorize(node1, f)) == grpcwire.PERMISSION_DENIED
    # Workload certificates cannot request anything; other trust domains are not authenticated.
    assert _code(lambda: service.authorize(web, str(web))) == grpcwire.PERMISSION_DENIED
    other_td = pki.node_identity("example.org", "node1")
    assert _code(lambda: service.authorize(other_td, None)) == grpcwire.UNAUTHENTICATED
    assert _code(lambda: service.authorize(None, None)) == grpcwire.UNAUTHENTICATED
    assert _code(lambda: service.authorize(node1, "not-a-spiffe-id")) == grpcwire.INVALID_ARGUMENT
    # Removed from the mesh state: nothing, not even its own node identity.
    (tmp_path / "mesh.yaml").write_text("workloads: []\n")
    assert _code(lambda: service.authorize(node1, None)) == grpcwire.PERMISSION_DENIED


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    ceilings = [backoff_delay(n, 1.0, 60.0, rng=lambda: 1.0) for n in (1, 2, 3, 6, 7, 20)]
    assert ceilings == [1, 2, 4, 32, 60, 60]
    assert backoff_delay(5, 1.0, 60.0, rng=lambda: 0.0) == 0.1  # floor: never a busy loop
    samples = {round(backoff_delay(4, 1.0, 60.0), 3) for _ in range(200)}
    assert len(samples) > 50 and max(samples) <= 8 and min(samples) >= 0.1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ztproxy.identity", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_ca_init_check_sign_and_cert_show(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    init = run_cli("ca", "init", "--ca-dir", str(ca_dir), "--json")
    assert init.returncode == 0, init.stderr
    summary = json.loads(init.stdout)
    assert summary["roots"] == 1 and summary["signing_cert"]["remaining_seconds"] > 300 * 86400
    again = run_cli("ca", "init", "--ca-dir", str(ca_dir))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert run_cli("ca", "check", "--ca-dir", str(ca_dir)).returncode == 0
    bad = run_cli("ca", "check", "--ca-dir", str(tmp_path))
    assert (
        bad.returncode == 1
        and bad.stderr.startswith("ztproxy: CA directory")
        and "Traceback" not in bad.stderr
    )

    key = pki.generate_key()
    identity = pki.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
    (tmp_path / "req.csr").write_text(pki.make_csr(key, identity))
    signed = run_cli(
        "ca",
        "sign",
        "--ca-dir",
        str(ca_dir),
        "--identity",
        str(identity),
        "--csr",
        str(tmp_path / "req.csr"),
        "--ttl",
        "7200",
    )
    assert signed.returncode == 0, signed.stderr
    certs = tmp_path / "certs"
    (certs / "shop" / "web").mkdir(parents=True)
    (certs / "shop" / "web" / "cert-chain.pem").write_text(signed.stdout)
    (certs / "shop" / "web" / "key.pem").write_text(pki.key_pem(key))
    (certs / "root-cert.pem").write_text((ca_dir / "root-cert.pem").read_text())

    human = run_cli("cert", "show", "--certs-dir", str(certs), "--trust-bundle", str(certs / "root-cert.pem"))
    assert human.returncode == 0, human.stderr
    line = next(ln for ln in human.stdout.splitlines() if ln.startswith(str(identity)))
    assert " valid " in line and "2h0" in line  # lifetime ~ 2 h (plus the 2 minute backdating)
    shown = json.loads(
        run_cli(
            "cert",
            "show",
            "--certs-dir",
            str(certs),
            "--trust-bundle",
            str(certs / "root-cert.pem"),
            "--json",
        ).stdout
    )
    entry = shown["identities"][0]
    leaf = pki.load_cert_file(str(certs / "shop/web/cert-chain.pem"))[0]
    assert entry["identity"] == str(identity) and entry["status"] == "valid"
    assert entry["serial"] == pki.serial_hex(leaf) and "ztmesh intermediate CA" in entry["issuer"]
    assert 7100 < entry["remaining_seconds"] <= 7200 and entry["lifetime_seconds"] == 7320
    assert len(shown["roots"]) == 1

    # A mismatched key is reported and makes the command fail (usable as a health check).
    (certs / "shop" / "web" / "key.pem").write_text(pki.key_pem(pki.generate_key()))
    broken = run_cli(
        "cert", "show", "--certs-dir", str(certs), "--trust-bundle", str(certs / "root-cert.pem")
    )
    assert broken.returncode == 1 and "key.pem does not match the certificate" in broken.stdout
