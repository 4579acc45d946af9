"""Deny list and CRLs: what `RevocationList.is_revoked` refuses, and that it cannot be fooled."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from ztproxy.identity import pki
from ztproxy.identity.revocation import RevocationList, make_crl, parse_deny_list

WORKLOAD = pki.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


@pytest.fixture
def ca(tmp_path: Path) -> pki.CaMaterial:
    return pki.create_ca(str(tmp_path / "ca"))


def leaf(ca: pki.CaMaterial, identity: pki.SpiffeId = WORKLOAD):
    return pki.issue_leaf(ca, pki.generate_key().public_key(), identity, 600)


def test_deny_list_by_serial_spiffe_id_and_node(tmp_path: Path, ca: pki.CaMaterial) -> None:
    cert, other = leaf(ca), leaf(ca, pki.SpiffeId.parse("spiffe://cluster.local/ns/bank/sa/vault"))
    node = leaf(ca, pki.node_identity("cluster.local", "web-3"))
    deny = tmp_path / "deny.yaml"
    deny.write_text("serials: []\n")
    revocations = RevocationList(deny_list_path=str(deny), min_interval=0)
    assert not any(revocations.is_revoked(c) for c in (cert, other, node))

    deny.write_text(f"serials: ['{pki.serial_hex(cert).upper()}']\n")
    assert revocations.check(cert) == f"serial {pki.serial_hex(cert)} is on the deny list"
    assert not revocations.is_revoked(other)

    deny.write_text("spiffeIds: ['spiffe://cluster.local/ns/bank/sa/vault']\nnodes: [web-3]\n")
    assert not revocations.is_revoked(cert)
    assert revocations.is_revoked(other) and revocations.is_revoked(node.public_bytes(Encoding.DER))
    assert revocations.check(node) == "node web-3 is on the deny list"


def test_broken_deny_list_keeps_the_previous_one_but_fails_at_start(
    tmp_path: Path, ca: pki.CaMaterial
) -> None:
    cert = leaf(ca)
    deny = tmp_path / "deny.yaml"
    deny.write_text(f"serials: ['{pki.serial_hex(cert)}']\n")
    revocations = RevocationList(deny_list_path=str(deny), min_interval=0)
    deny.write_text("serials: [not-hex\n")
    assert revocations.is_revoked(cert), "a bad render must not un-revoke anything"
    with pytest.raises(pki.IdentityError, match="not valid YAML"):
        RevocationList(deny_list_path=str(deny))
    with pytest.raises(pki.IdentityError, match="unknown keys"):
        parse_deny_list("serial: [1]\n")
    with pytest.raises(pki.IdentityError, match="not hexadecimal"):
        parse_deny_list("serials: [xyz]\n")


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_crl_signed_by_the_ca_revokes_and_openssl_agrees(tmp_path: Path, ca: pki.CaMaterial) -> None:
    revoked, kept = leaf(ca), leaf(ca)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(make_crl(ca, [revoked.serial_number]))
    issuers = tmp_path / "ca" / "cert-chain.pem"
    # Independent check: openssl verifies the CRL's signature and lists the serial.
    out = subprocess.run(
        ["openssl", "crl", "-in", str(crl), "-CAfile", str(issuers), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "verify OK" in out.stderr + out.stdout
    assert pki.serial_hex(revoked).upper() in out.stdout.upper().replace(":", "")
    revocations = RevocationList(crl_paths=[str(crl)], crl_issuer_paths=[str(issuers)])
    assert revocations.check(revoked).startswith(f"serial {pki.serial_hex(revoked)} is revoked by a CRL")
    assert not revocations.is_revoked(kept)


def test_crl_not_signed_by_a_known_ca_is_ignored(tmp_path: Path, ca: pki.CaMaterial) -> None:
    victim = leaf(ca)
    # A CRL made by another CA whose intermediate has the same name cannot revoke our certificates.
    other = pki.create_ca(str(tmp_path / "other"))
    forged_ca = pki.CaMaterial(
        directory="",
        signing_cert=ca.signing_cert,
        signing_key=other.signing_key,
        chain=[],
        roots=[],
        anchor=ca.anchor,
    )
    crl = tmp_path / "forged.pem"
    crl.write_bytes(make_crl(forged_ca, [victim.serial_number]))
    issuers = str(tmp_path / "ca" / "cert-chain.pem")
    with pytest.raises(pki.IdentityError, match="is not signed by any CA certificate"):
        RevocationList(crl_paths=[str(crl)], crl_issuer_paths=[issuers])
    good = tmp_path / "good.pem"
    good.write_bytes(make_crl(ca, []))
    revocations = RevocationList(crl_paths=[str(good)], crl_issuer_paths=[issuers], min_interval=0)
    shutil.copy(crl, good)  # later replaced by a forgery: ignored with an error
    assert not revocations.is_revoked(victim)
