"""ztmesh_cert (node) and ztmesh_ca (controller) run through real Ansible: enrollment end to end.

Checks: the private key never appears in any module result, file modes and owners, idempotence,
check mode changes nothing, bad input fails with a message and changes nothing, and the installed
chain verifies with openssl.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from ansible_module import run_module
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ztproxy.identity import pki

IDENTITY = "spiffe://cluster.local/ns/shop/sa/cart"


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


def public_der(csr_pem: str) -> bytes:
    return pki.parse_csr(csr_pem).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _no_key_material(*results: dict) -> None:
    dumped = json.dumps(results)
    assert "PRIVATE KEY" not in dumped, "a private key left the node through a module result"


def enroll(certs: Path, ca_dir: Path, **extra) -> tuple[dict, dict, dict]:
    args = dict(namespace="shop", service_account="cart", certs_dir=str(certs), **extra)
    req = run_module("ztmesh_cert", dict(args, state="csr"))
    assert not req.get("failed"), req.get("msg")
    signed = run_module(
        "ztmesh_ca", {"ca_dir": str(ca_dir), "sign": [{"identity": req["identity"], "csr": req["csr"]}]}
    )
    assert not signed.get("failed"), signed.get("msg")
    installed = run_module(
        "ztmesh_cert",
        dict(
            args,
            cert_chain=signed["certificates"][0]["cert_chain"],
            trust_bundle_content=signed["trust_bundle"],
        ),
    )
    assert not installed.get("failed"), installed.get("msg")
    _no_key_material(req, signed, installed)
    return req, signed, installed


def test_enrollment_installs_a_verifiable_chain_with_right_modes_and_is_idempotent(tmp_path: Path) -> None:
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    req, signed, installed = enroll(certs, ca_dir)
    assert req["changed"] and req["needs_certificate"] and req["reason"] == "no certificate installed"
    assert signed["created"] and signed["changed"]
    assert installed["changed"] and installed["certificate"]["identity"] == IDENTITY
    assert _tree(certs) == {
        "root-cert.pem": 0o644,
        "shop": 0o755,
        "shop/cart": 0o755,
        "shop/cart/cert-chain.pem": 0o644,
        "shop/cart/key.pem": 0o600,
    }
    chain = pki.load_cert_file(str(certs / "shop/cart/cert-chain.pem"))
    (tmp_path / "inter.pem").write_text(pki.certs_pem(chain[1:]))
    (tmp_path / "leaf.pem").write_text(pki.cert_pem(chain[0]))
    verdict = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(certs / "root-cert.pem"),
            "-untrusted",
            str(tmp_path / "inter.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    # The key that signs for the certificate is the one generated on the node (proof via the module's CSR).
    key = pki.load_key_file(str(certs / "shop/cart/key.pem"))
    assert pki.key_matches_cert(key, chain[0])

    # Second run: nothing to do at any step.
    again = run_module(
        "ztmesh_cert",
        {"namespace": "shop", "service_account": "cart", "certs_dir": str(certs), "state": "csr"},
    )
    assert not again["changed"] and not again["needs_certificate"] and again["csr"] is None
    reinstall = run_module(
        "ztmesh_cert",
        {
            "namespace": "shop",
            "service_account": "cart",
            "certs_dir": str(certs),
            "cert_chain": signed["certificates"][0]["cert_chain"],
            "trust_bundle_content": signed["trust_bundle"],
        },
    )
    assert not reinstall["changed"], reinstall
    assert not run_module("ztmesh_ca", {"ca_dir": str(ca_dir)})["changed"]

    # state=absent removes the identity (and only it), once.
    gone = run_module("ztmesh_cert", {"identity": IDENTITY, "certs_dir": str(certs), "state": "absent"})
    assert gone["changed"] and not (certs / "shop/cart").exists() and (certs / "root-cert.pem").exists()
    assert not run_module("ztmesh_cert", {"identity": IDENTITY, "certs_dir": str(certs), "state": "absent"})[
        "changed"
    ]


def test_pending_key_is_reused_until_installed_and_force_makes_a_new_one(tmp_path: Path) -> None:
    args = {"identity": IDENTITY, "certs_dir": str(tmp_path), "state": "csr"}
    first, second = run_module("ztmesh_cert", args), run_module("ztmesh_cert", args)
    assert first["changed"] and not second["changed"]
    # Same pending key both times (the CSR text differs: ECDSA signatures are randomized).
    assert public_der(first["csr"]) == public_der(second["csr"])
    forced = run_module("ztmesh_cert", dict(args, force=True))
    assert forced["changed"] and public_der(forced["csr"]) != public_der(first["csr"])
    assert stat.S_IMODE((tmp_path / "shop/cart/key.pem.pending").stat().st_mode) == 0o600


def test_check_mode_writes_nothing(tmp_path: Path) -> None:
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    req = run_module(
        "ztmesh_cert", {"identity": IDENTITY, "certs_dir": str(certs), "state": "csr"}, check=True
    )
    assert req["changed"] and req["needs_certificate"] and req["csr"] is None
    ca = run_module("ztmesh_ca", {"ca_dir": str(ca_dir)}, check=True)
    assert ca["changed"] and ca["created"]
    assert not certs.exists() and not ca_dir.exists()
    # Installed identity: check mode with a new chain reports the change but leaves the files alone.
    _req, signed, _inst = enroll(certs, ca_dir)
    before = (certs / "shop/cart/cert-chain.pem").read_bytes()
    req = run_module(
        "ztmesh_cert", {"identity": IDENTITY, "certs_dir": str(certs), "state": "csr", "force": True}
    )
    new = run_module(
        "ztmesh_ca", {"ca_dir": str(ca_dir), "sign": [{"identity": IDENTITY, "csr": req["csr"]}]}
    )
    dry = run_module(
        "ztmesh_cert",
        {"identity": IDENTITY, "certs_dir": str(certs), "cert_chain": new["certificates"][0]["cert_chain"]},
        check=True,
        diff=True,
    )
    assert (
        dry["changed"] and dry["diff"]["before"]["certificate"]["serial"] != new["certificates"][0]["serial"]
    )
    assert (certs / "shop/cart/cert-chain.pem").read_bytes() == before
    assert (certs / "shop/cart/key.pem.pending").exists()


def test_foreign_or_mismatched_certificates_are_refused_and_change_nothing(tmp_path: Path) -> None:
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    _req, signed, _inst = enroll(certs, ca_dir)
    snapshot = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    # A certificate for another identity.
    other = pki.make_csr(pki.generate_key(), pki.SpiffeId.parse("spiffe://cluster.local/ns/bank/sa/vault"))
    foreign = run_module(
        "ztmesh_ca",
        {
            "ca_dir": str(ca_dir),
            "sign": [{"identity": "spiffe://cluster.local/ns/bank/sa/vault", "csr": other}],
        },
    )
    bad = run_module(
        "ztmesh_cert",
        {
            "identity": IDENTITY,
            "certs_dir": str(certs),
            "cert_chain": foreign["certificates"][0]["cert_chain"],
        },
    )
    assert bad["failed"] and "is for spiffe://cluster.local/ns/bank/sa/vault" in bad["msg"]
    # A certificate for the right identity but a key that is not on this node.
    stranger = pki.make_csr(pki.generate_key(), pki.SpiffeId.parse(IDENTITY))
    signed2 = run_module(
        "ztmesh_ca", {"ca_dir": str(ca_dir), "sign": [{"identity": IDENTITY, "csr": stranger}]}
    )
    bad = run_module(
        "ztmesh_cert",
        {
            "identity": IDENTITY,
            "certs_dir": str(certs),
            "cert_chain": signed2["certificates"][0]["cert_chain"],
        },
    )
    assert bad["failed"] and "does not match the key generated on this node" in bad["msg"]
    # A chain from another CA than the trust bundle's.
    req = run_module(
        "ztmesh_cert", {"identity": IDENTITY, "certs_dir": str(certs), "state": "csr", "force": True}
    )
    other_ca = run_module(
        "ztmesh_ca", {"ca_dir": str(tmp_path / "ca2"), "sign": [{"identity": IDENTITY, "csr": req["csr"]}]}
    )
    bad = run_module(
        "ztmesh_cert",
        {
            "identity": IDENTITY,
            "certs_dir": str(certs),
            "cert_chain": other_ca["certificates"][0]["cert_chain"],
        },
    )
    assert bad["failed"] and "does not lead to a trusted root" in bad["msg"]
    # An identity of another trust domain than the controller's.
    wrong_td = run_module(
        "ztmesh_ca",
        {
            "ca_dir": str(ca_dir),
            "sign": [{"identity": "spiffe://other.org/ns/shop/sa/cart", "csr": req["csr"]}],
        },
    )
    assert wrong_td["failed"] and "not in trust domain cluster.local" in wrong_td["msg"]
    for path, content in snapshot.items():
        assert path.read_bytes() == content, f"{path} changed although every call failed"


def test_ca_module_refuses_bad_plugin_ca_and_missing_ca_without_create(tmp_path: Path) -> None:
    missing = run_module("ztmesh_ca", {"ca_dir": str(tmp_path / "none"), "create": False})
    assert missing["failed"] and "holds no CA and create=false" in missing["msg"]
    assert not (tmp_path / "none").exists()
    ca = run_module("ztmesh_ca", {"ca_dir": str(tmp_path / "a")})
    run_module("ztmesh_ca", {"ca_dir": str(tmp_path / "b")})
    shutil.copy(tmp_path / "b" / "ca-key.pem", tmp_path / "a" / "ca-key.pem")
    mismatch = run_module("ztmesh_ca", {"ca_dir": str(tmp_path / "a"), "create": False})
    assert mismatch["failed"] and "ca-key.pem does not belong to ca-cert.pem" in mismatch["msg"]
    assert ca["ca"]["roots"] == 1


def test_extra_roots_make_a_two_root_bundle(tmp_path: Path) -> None:
    run_module("ztmesh_ca", {"ca_dir": str(tmp_path / "old")})
    new = run_module(
        "ztmesh_ca", {"ca_dir": str(tmp_path / "new"), "extra_roots": [str(tmp_path / "old/root-cert.pem")]}
    )
    roots = pki.load_certs(new["trust_bundle"])
    assert len(roots) == 2 and all(pki.is_self_signed(r) for r in roots)
    certs = tmp_path / "certs"
    bundle = run_module("ztmesh_cert", {"certs_dir": str(certs), "trust_bundle_content": new["trust_bundle"]})
    assert bundle["changed"] and len(bundle["trust_roots"]) == 2
    assert not run_module(
        "ztmesh_cert", {"certs_dir": str(certs), "trust_bundle_content": new["trust_bundle"]}
    )["changed"]
    not_root = run_module(
        "ztmesh_cert", {"certs_dir": str(certs), "trust_bundle_content": new["signing_cert"]}
    )
    assert not_root["failed"] and "not a self-signed CA certificate" in not_root["msg"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing file owners needs root")
def test_owner_and_group_are_applied_and_drift_is_repaired(tmp_path: Path) -> None:
    user = pwd.getpwnam("nobody")
    group = grp.getgrgid(user.pw_gid)
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    enroll(certs, ca_dir, owner=user.pw_name, group=group.gr_name)
    for path in (certs / "shop/cart/key.pem", certs / "shop/cart/cert-chain.pem", certs / "root-cert.pem"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), path
    os.chmod(certs / "shop/cart/key.pem", 0o644)
    repaired = run_module(
        "ztmesh_cert",
        {"identity": IDENTITY, "certs_dir": str(certs), "owner": user.pw_name, "group": group.gr_name},
    )
    assert repaired["changed"] and stat.S_IMODE((certs / "shop/cart/key.pem").stat().st_mode) == 0o600
    unknown = run_module(
        "ztmesh_cert", {"identity": IDENTITY, "certs_dir": str(certs), "owner": "no-such-user-zi"}
    )
    assert unknown["failed"] and "create the ztproxy user first" in unknown["msg"]


def test_node_identity_enrollment(tmp_path: Path) -> None:
    req = run_module("ztmesh_cert", {"node_name": "web-1", "certs_dir": str(tmp_path), "state": "csr"})
    assert req["identity"] == "spiffe://cluster.local/ns/ztmesh-system/sa/node-web-1"
    bad = run_module("ztmesh_cert", {"namespace": "shop", "certs_dir": str(tmp_path), "state": "csr"})
    assert bad["failed"] and "namespace and service_account go together" in bad["msg"]
