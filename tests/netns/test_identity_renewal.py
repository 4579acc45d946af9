"""Online renewal inside ``ztproxy run``: with ``ca.addresses`` in the settings, the proxy renews its
workload certificate from the mesh CA (a real ``ztproxy ca serve`` process) at half-life and serves the
new certificate on new HBONE connections, without a restart. Both processes run through ztproxy's own
command line in a fresh network namespace; the HBONE client is independent (h2 + ssl)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from cryptography import x509
from proxy_harness import H2TunnelClient, client_tls_context, stop_process, ztproxy_cmd, ztproxy_env
from pyroute2 import netns as pyroute2_netns

from ztproxy.identity import pki

pytestmark = pytest.mark.timeout(120)

TD = "cluster.local"
API = pki.SpiffeId.parse("spiffe://cluster.local/ns/backend/sa/api")
NODE = pki.node_identity(TD, "node-b")
SHORT_TTL = 16  # seconds: renewal is due after 8


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    pyroute2_netns.pushns(name)
    try:
        yield
    finally:
        pyroute2_netns.popns()


def install(certs: Path, ca: pki.CaMaterial, identity: pki.SpiffeId, ttl: int) -> x509.Certificate:
    key = pki.generate_key()
    leaf = pki.issue_leaf(ca, key.public_key(), identity, ttl)
    directory = Path(pki.identity_dir(str(certs), identity))
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_file(str(directory / "key.pem"), pki.key_pem(key), 0o600)
    pki.write_file(str(directory / "cert-chain.pem"), pki.certs_pem([leaf] + ca.chain), 0o644)
    return leaf


def installed_serial(certs: Path, identity: pki.SpiffeId) -> int:
    chain = Path(pki.identity_dir(str(certs), identity)) / "cert-chain.pem"
    return pki.load_cert_file(str(chain))[0].serial_number


def served_serial(netns: str, ctx) -> int:
    """The serial of the certificate ztproxy presents on a new HBONE connection; the CONNECT succeeds."""
    with in_netns(netns):
        client = H2TunnelClient(("127.0.0.1", 15008), ctx)
    try:
        der = client.sock.getpeercert(binary_form=True)
        sid = client.connect("127.0.0.1:15099")  # nothing listens there: the proxy answers 503
        assert client.wait_status(sid) == 503
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        client.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.2)


def test_run_renews_from_the_mesh_ca_and_serves_the_new_certificate(netns, tmp_path) -> None:
    ca_dir = tmp_path / "ca"
    ca = pki.create_ca(str(ca_dir))
    certs = tmp_path / "certs"
    certs.mkdir()
    bundle = certs / "root-cert.pem"
    bundle.write_text(ca.roots_pem)
    mesh_state = tmp_path / "mesh-state.yaml"
    mesh_state.write_text(yaml.safe_dump({"workloads": [
        {"name": "api", "namespace": "backend", "serviceAccount": "api", "workloadIps": ["127.0.0.1"],
         "protocol": "HBONE", "node": "node-b"}]}))
    install(certs, ca, NODE, 600)  # enrolled by Ansible: the node identity authenticates renewals
    first = install(certs, ca, API, SHORT_TTL).serial_number
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        ca_port = probe.getsockname()[1]  # free in the root namespace, and the test namespace is empty
    settings = tmp_path / "ztproxy.yaml"
    settings.write_text(yaml.safe_dump({
        "node_name": "node-b", "trust_domain": TD, "mesh_state": str(mesh_state), "certs_dir": str(certs),
        "trust_bundle": str(bundle), "preserve_source": False, "reload_interval": 0.2, "log_level": "info",
        "listen": {"outbound": None, "inbound": "127.0.0.1:15008", "inbound_plaintext": None,
                   "transparent": False, "dns": None},
        "ca": {"addresses": [f"127.0.0.1:{ca_port}"], "cert_ttl": 600, "renew_fraction": 0.5},
    }))

    signer_log, proxy_log = tmp_path / "signer.log", tmp_path / "proxy.log"
    with open(signer_log, "wb") as out:
        signer = subprocess.Popen(["ip", "netns", "exec", netns, *ztproxy_cmd(
            "ca", "serve", "--ca-dir", str(ca_dir), "--mesh-state", str(mesh_state), "--trust-domain", TD,
            "--listen", f"127.0.0.1:{ca_port}")], stdout=out, stderr=subprocess.STDOUT, env=ztproxy_env())
    with open(proxy_log, "wb") as out:
        run = ztproxy_cmd("run", "--config", str(settings))
        proxy = subprocess.Popen(["ip", "netns", "exec", netns, *run], stdout=out, stderr=subprocess.STDOUT,
                                 env=ztproxy_env())
    try:
        wait_for(lambda: "listening on" in signer_log.read_text() or signer.poll() is not None, 20, "signer")
        assert signer.poll() is None, signer_log.read_text()
        wait_for(lambda: "ztproxy ready" in proxy_log.read_text() or proxy.poll() is not None, 20, "ztproxy")
        assert proxy.poll() is None, proxy_log.read_text()
        # The renewer starts right after the listeners announce readiness: wait for its line too.
        wait_for(lambda: "online certificate renewal from 127.0.0.1" in proxy_log.read_text(), 10,
                 "the renewer to start")

        key = pki.generate_key()
        client = pki.issue_leaf(ca, key.public_key(),
                                pki.SpiffeId.parse("spiffe://cluster.local/ns/frontend/sa/web"), 600)
        (tmp_path / "client").mkdir()
        pki.write_file(str(tmp_path / "client" / "chain.pem"), pki.certs_pem([client] + ca.chain), 0o644)
        pki.write_file(str(tmp_path / "client" / "key.pem"), pki.key_pem(key), 0o600)
        ctx = client_tls_context(None, bundle, tmp_path / "client")
        ctx.load_cert_chain(str(tmp_path / "client" / "chain.pem"), str(tmp_path / "client" / "key.pem"))

        assert served_serial(netns, ctx) == first
        # at half of the 16 s lifetime the renewer gets a new certificate from the CA and installs it...
        wait_for(lambda: installed_serial(certs, API) != first, 40, f"renewal\n{proxy_log.read_text()}")
        renewed = installed_serial(certs, API)
        summary = pki.summarize(pki.load_cert_file(
            str(Path(pki.identity_dir(str(certs), API)) / "cert-chain.pem"))[0])
        assert 600 <= summary.lifetime <= 600 + pki.CLOCK_SKEW_GRACE  # the settings' cert_ttl (+ backdating)
        # ...and the running proxy presents it on new connections, without a restart
        wait_for(lambda: served_serial(netns, ctx) == renewed, 10, "the new certificate served")
        assert f"renewed {API}" in proxy_log.read_text()

        # `ztproxy cert show` (the identity commands wired into ztproxy's CLI) sees the renewed identity
        show = subprocess.run(ztproxy_cmd("cert", "show", "--certs-dir", str(certs), "--trust-bundle",
                                          str(bundle), "--json"), capture_output=True, text=True,
                              env=ztproxy_env(), timeout=60)
        assert show.returncode == 0, show.stderr
        identities = {entry["identity"]: entry for entry in json.loads(show.stdout)["identities"]}
        assert identities[str(API)]["status"] == "valid"

        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(20) == 0, proxy_log.read_text()
        assert "certificate renewer did not stop" not in proxy_log.read_text()
    finally:
        stop_process(proxy)
        stop_process(signer)
