"""Workload certificates: validation with clear errors, and reload that keeps the last good one."""

from __future__ import annotations

import datetime
import logging

import pytest
from pki import CA, now
from proxy_harness import MeshFiles

from ztproxy.certs import CertError, CertStore, IdentityFiles, validate_identity
from ztproxy.identity.pki import IdentityError, SpiffeId

ID = "spiffe://cluster.local/ns/default/sa/web"


@pytest.fixture
def files(tmp_path) -> MeshFiles:
    return MeshFiles(tmp_path)


def _validate(files: MeshFiles) -> datetime.datetime:
    identity_files = IdentityFiles.under(str(files.certs_dir), "default", "web")
    return validate_identity(identity_files, str(files.bundle), ID)


def test_parse_spiffe() -> None:
    # The proxy parses SPIFFE IDs with the identity module's SpiffeId, the one parser of them.
    assert SpiffeId.parse(ID) == SpiffeId("cluster.local", "default", "web")
    for bad in ("spiffe://cluster.local/ns/default", "https://x/ns/a/sa/b", "spiffe:///ns/a/sa/b",
                "spiffe://td/ns//sa/b", "spiffe://td/sa/b/ns/a"):
        with pytest.raises(IdentityError):
            SpiffeId.parse(bad)
    store = CertStore("/nonexistent", "/nonexistent")
    with pytest.raises(CertError, match="not a SPIFFE ID"):
        store.get("https://x/ns/a/sa/b")


def test_valid_chain_with_intermediate(files: MeshFiles) -> None:
    leaf = files.install("default", "web")
    assert _validate(files) == leaf.cert.not_valid_after_utc


def test_several_roots_in_the_bundle(files: MeshFiles, tmp_path) -> None:
    other = CA.root("next root")
    files.root.write_bundle(files.bundle, other)
    files.install("default", "web", other.issue(ID))
    _validate(files)


@pytest.mark.parametrize("case, message", [
    ("expired", "expired at"),
    ("not_yet_valid", "not valid before"),
    ("wrong_id", "expected URI SAN spiffe://cluster.local/ns/default/sa/web"),
    ("wrong_trust_domain", "spiffe://example.org/ns/default/sa/web"),
    ("key_mismatch", "does not match the certificate"),
    ("foreign_root", "does not lead to any root in the trust bundle"),
    ("garbage", "cannot be parsed"),
    ("missing", "cannot read certificate chain"),
    ("no_san", "no SPIFFE ID"),
])
def test_bad_certificates_are_explained(files: MeshFiles, case: str, message: str) -> None:
    directory = files.certs_dir / "default" / "web"
    if case == "expired":
        files.install("default", "web", files.ca.issue(ID, not_after=now() - datetime.timedelta(hours=1)))
    elif case == "not_yet_valid":
        files.install("default", "web", files.ca.issue(ID, not_before=now() + datetime.timedelta(hours=1),
                                                       not_after=now() + datetime.timedelta(hours=5)))
    elif case == "wrong_id":
        files.install("default", "web", files.ca.issue("spiffe://cluster.local/ns/default/sa/other"))
    elif case == "wrong_trust_domain":
        files.install("default", "web", files.ca.issue("spiffe://example.org/ns/default/sa/web"))
    elif case == "key_mismatch":
        leaf = files.install("default", "web")
        other = files.ca.issue(ID)
        (directory / "key.pem").write_bytes(other.key_pem())
        assert leaf is not None
    elif case == "foreign_root":
        files.install("default", "web", CA.root("stranger").intermediate().issue(ID))
    elif case == "garbage":
        files.install("default", "web")
        (directory / "cert-chain.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n"
                                                  "-----END CERTIFICATE-----\n")
    elif case == "no_san":
        files.install("default", "web", files.ca.issue(None))
    with pytest.raises(CertError) as err:
        _validate(files)
    assert message in str(err.value)


def test_store_reloads_and_keeps_last_good_certificate(files: MeshFiles, caplog) -> None:
    first = files.install("default", "web")
    store = CertStore(str(files.certs_dir), str(files.bundle))
    entry = store.get(ID)
    assert entry.expires == first.cert.not_valid_after_utc
    store.refresh()
    assert store.get(ID) is entry  # unchanged files: same contexts

    later = now() + datetime.timedelta(hours=48)
    renewed = files.install("default", "web", files.ca.issue(ID, not_after=later))
    store.refresh()
    second = store.get(ID)
    assert second.expires == renewed.cert.not_valid_after_utc
    assert second.generation > entry.generation

    files.install("default", "web", files.ca.issue(ID, not_after=now() - datetime.timedelta(minutes=1)))
    with caplog.at_level(logging.ERROR, logger="ztproxy.certs"):
        store.refresh()
    assert "rejected, keeping the previous one" in caplog.text and "expired" in caplog.text
    assert store.get(ID) is second


def test_store_refuses_unusable_identity(files: MeshFiles) -> None:
    store = CertStore(str(files.certs_dir), str(files.bundle))
    with pytest.raises(CertError, match="cannot read certificate chain"):
        store.get(ID)
