"""CA material, CSRs and certificates, checked by OpenSSL (an independent implementation) where it matters.

The Istio plug-in CA used here is made with the openssl command line, the way Istio's own
tools/certs Makefile does (RSA root, RSA intermediate, cert-chain.pem = ca-cert + root), so loading it
is a real test of accepting a foreign CA.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztproxy.identity import pki

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command line tool")

WORKLOAD = pki.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


def openssl(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def istio_plugin_ca(directory: Path) -> Path:
    """An Istio plug-in CA made by openssl only (RSA, like istio/tools/certs)."""
    directory.mkdir(parents=True)
    write(
        directory / "root.cnf",
        "[req]\ndistinguished_name=dn\nx509_extensions=v3\n[dn]\n[v3]\n"
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n",
    )
    write(
        directory / "int.cnf",
        "[v3]\nbasicConstraints=critical,CA:TRUE,pathlen:0\n"
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\nsubjectAltName=URI:spiffe://cluster.local/ns/istio-system/sa/citadel\n",
    )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "root-key.pem",
        "-out",
        "root-cert.pem",
        "-days",
        "30",
        "-subj",
        "/O=Istio/CN=Root CA",
        "-config",
        "root.cnf",
        cwd=directory,
    )
    openssl(
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.csr",
        "-subj",
        "/O=Istio/CN=Intermediate CA/L=vm-cluster",
        cwd=directory,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-key.pem",
        "-CAcreateserial",
        "-days",
        "20",
        "-extfile",
        "int.cnf",
        "-extensions",
        "v3",
        "-out",
        "ca-cert.pem",
        cwd=directory,
    )
    (directory / "cert-chain.pem").write_text(
        (directory / "ca-cert.pem").read_text() + (directory / "root-cert.pem").read_text()
    )
    return directory


def issue_with_openssl_csr(ca: pki.CaMaterial, tmp: Path, identity: pki.SpiffeId) -> tuple[Path, Path]:
    """CSR made by openssl (as a foreign client would), signed by us; returns (leaf, chain) paths."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(tmp / "w.key"))
    openssl(
        "req",
        "-new",
        "-key",
        str(tmp / "w.key"),
        "-subj",
        "/",
        "-addext",
        f"subjectAltName=critical,URI:{identity}",
        "-out",
        str(tmp / "w.csr"),
    )
    leaf = pki.sign_csr(ca, (tmp / "w.csr").read_text(), identity, 3600)
    leaf_path = write(tmp / "leaf.pem", pki.cert_pem(leaf))
    chain_path = write(tmp / "chain.pem", pki.certs_pem(c for c in ca.chain if not pki.is_self_signed(c)))
    return leaf_path, chain_path


# --- SPIFFE IDs ------------------------------------------------------------------------------------


def test_spiffe_id_round_trip_and_node_identity() -> None:
    assert str(WORKLOAD) == "spiffe://cluster.local/ns/shop/sa/cart"
    node = pki.node_identity("example.org", "web-1.dc1")
    assert str(node) == "spiffe://example.org/ns/ztmesh-system/sa/node-web-1.dc1"
    assert node.is_node and node.node_name == "web-1.dc1"
    assert not WORKLOAD.is_node


@pytest.mark.parametrize(
    "bad",
    [
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b/c",
        "spiffe://cluster.local/ns//sa/b",
        "spiffe://cluster.local/ns/a b/sa/c",
    ],
)
def test_bad_spiffe_ids_are_refused(bad: str) -> None:
    with pytest.raises(pki.IdentityError, match="SPIFFE|trust domain|not valid"):
        pki.SpiffeId.parse(bad)


# --- ztmesh's own CA ---------------------------------------------------------------------------------


def test_ca_init_writes_istio_layout_with_private_keys_0600(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca = pki.create_ca(str(ca_dir))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ca_dir.iterdir()}
    assert modes == {
        "ca-cert.pem": 0o644,
        "ca-key.pem": 0o600,
        "root-cert.pem": 0o644,
        "cert-chain.pem": 0o644,
        "root-key.pem": 0o600,
    }
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    openssl("verify", "-CAfile", "root-cert.pem", "ca-cert.pem", cwd=ca_dir)
    text = openssl("x509", "-in", "ca-cert.pem", "-noout", "-text", cwd=ca_dir).stdout
    assert "CA:TRUE, pathlen:0" in text and "Certificate Sign" in text
    assert ca.anchor.subject == ca.roots[0].subject
    with pytest.raises(pki.CaError, match="refusing to overwrite"):
        pki.create_ca(str(ca_dir))


def test_leaf_verifies_with_openssl_and_mirrors_istiod(tmp_path: Path) -> None:
    ca = pki.create_ca(str(tmp_path / "ca"))
    leaf_path, chain_path = issue_with_openssl_csr(ca, tmp_path, WORKLOAD)
    out = openssl(
        "verify",
        "-CAfile",
        str(tmp_path / "ca" / "root-cert.pem"),
        "-untrusted",
        str(chain_path),
        "-purpose",
        "sslclient",
        str(leaf_path),
    ).stdout
    assert out.strip().endswith(": OK")
    openssl(
        "verify",
        "-CAfile",
        str(tmp_path / "ca" / "root-cert.pem"),
        "-untrusted",
        str(chain_path),
        "-purpose",
        "sslserver",
        str(leaf_path),
    )
    exts = openssl(
        "x509",
        "-in",
        str(leaf_path),
        "-noout",
        "-ext",
        "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints",
    ).stdout
    assert "X509v3 Subject Alternative Name: critical" in exts
    assert f"URI:{WORKLOAD}" in exts
    assert "X509v3 Key Usage: critical" in exts and "Digital Signature, Key Encipherment" in exts
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in exts
    assert "X509v3 Basic Constraints: critical" in exts and "CA:FALSE" in exts
    subject = openssl("x509", "-in", str(leaf_path), "-noout", "-subject").stdout.strip()
    assert subject == "subject="  # empty subject, like istiod
    leaf = pki.load_cert_file(str(leaf_path))[0]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    ski = ca.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert aki == ski
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.serial_number.bit_length() > 100
    lifetime = (pki.not_after(leaf) - pki.not_before(leaf)).total_seconds()
    assert 3600 + 119 <= lifetime <= 3600 + 121  # 1 h + istiod's 2 minute backdating


def test_leaf_lifetime_is_capped_by_the_signing_ca(tmp_path: Path) -> None:
    ca = pki.create_ca(str(tmp_path / "ca"), intermediate_days=1)
    leaf = pki.issue_leaf(ca, pki.generate_key().public_key(), WORKLOAD, ttl=30 * 86400)
    assert pki.not_after(leaf) <= pki.not_after(ca.signing_cert)


# --- Istio plug-in CA (made by openssl) ------------------------------------------------------------------


def test_istio_plugin_ca_is_accepted_and_its_certificates_verify(tmp_path: Path) -> None:
    plugin = istio_plugin_ca(tmp_path / "cacerts")
    ca = pki.load_ca(str(plugin))
    assert ca.signing_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Intermediate CA"
    assert len(ca.chain) == 1  # the root inside cert-chain.pem is not sent twice
    leaf_path, chain_path = issue_with_openssl_csr(ca, tmp_path, WORKLOAD)
    openssl("verify", "-CAfile", str(plugin / "root-cert.pem"), "-untrusted", str(chain_path), str(leaf_path))
    chain = pki.response_chain(ca, pki.load_cert_file(str(leaf_path))[0])
    assert len(chain) == 3 and pki.is_self_signed(pki.load_certs(chain[-1])[0])


def test_istio_plugin_ca_without_cert_chain_file_is_accepted(tmp_path: Path) -> None:
    plugin = istio_plugin_ca(tmp_path / "cacerts")
    (plugin / "cert-chain.pem").unlink()
    assert pki.load_ca(str(plugin)).signing_cert == pki.load_cert_file(str(plugin / "ca-cert.pem"))[0]


# --- bad CA material is refused with a message saying what to fix ------------------------------------------


def test_key_that_does_not_match_the_ca_cert_is_refused(tmp_path: Path) -> None:
    plugin = istio_plugin_ca(tmp_path / "cacerts")
    shutil.copy(plugin / "root-key.pem", plugin / "ca-key.pem")
    with pytest.raises(pki.CaError, match="ca-key.pem does not belong to ca-cert.pem"):
        pki.load_ca(str(plugin))


def test_end_entity_certificate_as_ca_is_refused(tmp_path: Path) -> None:
    ca = pki.create_ca(str(tmp_path / "real"))
    fake = tmp_path / "fake"
    fake.mkdir()
    key = pki.generate_key()
    leaf = pki.issue_leaf(ca, key.public_key(), WORKLOAD, 3600)
    write(fake / "ca-cert.pem", pki.cert_pem(leaf))
    write(fake / "ca-key.pem", pki.key_pem(key))
    shutil.copy(tmp_path / "real" / "root-cert.pem", fake / "root-cert.pem")
    with pytest.raises(pki.CaError, match="is not a CA certificate"):
        pki.load_ca(str(fake))


def _expired_intermediate(tmp_path: Path) -> Path:
    ca = pki.create_ca(str(tmp_path / "ca"))
    root_key = pki.load_key_file(str(tmp_path / "ca" / "root-key.pem"))
    key = ec.generate_private_key(ec.SECP256R1())
    past = pki.utcnow() - datetime.timedelta(days=10)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.anchor.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    out = tmp_path / "expired"
    out.mkdir()
    write(out / "ca-cert.pem", pki.cert_pem(cert))
    write(out / "ca-key.pem", pki.key_pem(key))
    shutil.copy(tmp_path / "ca" / "root-cert.pem", out / "root-cert.pem")
    return out


def test_expired_ca_is_refused(tmp_path: Path) -> None:
    out = _expired_intermediate(tmp_path)
    verdict = openssl("verify", "-CAfile", str(out / "root-cert.pem"), str(out / "ca-cert.pem"), check=False)
    assert verdict.returncode != 0 and "expired" in verdict.stdout + verdict.stderr  # openssl agrees
    with pytest.raises(pki.CaError, match="expired at"):
        pki.load_ca(str(out))


def test_ca_that_does_not_chain_to_root_cert_is_refused(tmp_path: Path) -> None:
    plugin = istio_plugin_ca(tmp_path / "cacerts")
    other = pki.create_ca(str(tmp_path / "other"))
    write(plugin / "root-cert.pem", pki.cert_pem(other.anchor))
    with pytest.raises(pki.CaError, match="does not lead to a trusted root"):
        pki.load_ca(str(plugin))


def test_cert_chain_must_start_with_ca_cert_and_root_file_hold_roots(tmp_path: Path) -> None:
    plugin = istio_plugin_ca(tmp_path / "cacerts")
    write(plugin / "cert-chain.pem", (plugin / "root-cert.pem").read_text())
    with pytest.raises(pki.CaError, match="must start with ca-cert.pem"):
        pki.load_ca(str(plugin))
    plugin2 = istio_plugin_ca(tmp_path / "cacerts2")
    write(plugin2 / "root-cert.pem", (plugin2 / "ca-cert.pem").read_text())
    with pytest.raises(pki.CaError, match="not a self-signed CA"):
        pki.load_ca(str(plugin2))


def test_missing_files_and_encrypted_key_are_explained(tmp_path: Path) -> None:
    with pytest.raises(pki.CaError, match="lacks ca-cert.pem, ca-key.pem, root-cert.pem.*ztproxy ca init"):
        pki.load_ca(str(tmp_path))
    plugin = istio_plugin_ca(tmp_path / "cacerts")
    openssl("pkey", "-in", "ca-key.pem", "-aes256", "-passout", "pass:secret", "-out", "enc.pem", cwd=plugin)
    shutil.move(plugin / "enc.pem", plugin / "ca-key.pem")
    with pytest.raises(pki.IdentityError, match="without a passphrase"):
        pki.load_ca(str(plugin))


# --- CSRs ----------------------------------------------------------------------------------------------


def test_csr_from_our_key_is_what_ztunnel_sends_and_openssl_accepts(tmp_path: Path) -> None:
    csr = write(tmp_path / "r.csr", pki.make_csr(pki.generate_key(), WORKLOAD))
    text = openssl("req", "-in", str(csr), "-noout", "-verify", "-text").stdout
    assert f"URI:{WORKLOAD}" in text and "ASN1 OID: prime256v1" in text


def test_csr_for_another_identity_or_weak_key_or_bad_signature_is_refused(tmp_path: Path) -> None:
    ca = pki.create_ca(str(tmp_path / "ca"))
    other = pki.make_csr(pki.generate_key(), pki.SpiffeId.parse("spiffe://cluster.local/ns/bank/sa/vault"))
    with pytest.raises(pki.IdentityError, match="asks for spiffe://cluster.local/ns/bank/sa/vault"):
        pki.sign_csr(ca, other, WORKLOAD)
    openssl(
        "req",
        "-new",
        "-newkey",
        "rsa:1024",
        "-nodes",
        "-keyout",
        "k.pem",
        "-subj",
        "/",
        "-out",
        "weak.csr",
        cwd=tmp_path,
    )
    with pytest.raises(pki.IdentityError, match="too small"):
        pki.sign_csr(ca, (tmp_path / "weak.csr").read_text(), WORKLOAD)
    good = x509.load_pem_x509_csr(pki.make_csr(pki.generate_key(), WORKLOAD).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # flip a bit of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.IdentityError, match="signature does not verify"):
        pki.sign_csr(ca, tampered, WORKLOAD)


# --- chain verification used before installing anything ---------------------------------------------------


def test_verify_chain_accepts_good_and_names_the_broken_link(tmp_path: Path) -> None:
    ca = pki.create_ca(str(tmp_path / "ca"))
    other = pki.create_ca(str(tmp_path / "other"))
    leaf = pki.issue_leaf(ca, pki.generate_key().public_key(), WORKLOAD, 600)
    path = pki.verify_chain(leaf, ca.chain, ca.roots)
    assert path[-1] == ca.anchor and len(path) == 3
    with pytest.raises(pki.IdentityError, match="does not lead to a trusted root"):
        pki.verify_chain(leaf, ca.chain, other.roots)
    with pytest.raises(pki.IdentityError, match="expired at"):
        pki.verify_chain(leaf, ca.chain, ca.roots, at=pki.utcnow() + datetime.timedelta(hours=1))


def test_write_file_is_atomic_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    pki.write_file(str(target), "one", 0o600)
    inode = target.stat().st_ino
    pki.write_file(str(target), "two", 0o600)
    assert target.read_text() == "two" and target.stat().st_ino != inode
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temporary file left behind
    assert os.access(target, os.R_OK)
