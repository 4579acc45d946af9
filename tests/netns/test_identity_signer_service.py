"""The signing service end to end: real `ztproxy ca serve` processes, real mTLS, HTTP/2 and gRPC on
loopback, certificates living a few seconds.

* renewals happen at half-life, again and again, for workload and node identities, across two signer
  instances, and go on when one instance dies;
* a foreign identity, a node removed from the mesh state, an expired, revoked or foreign client
  certificate are all refused;
* independent clients: grpcio (if installed) and a raw HTTP/2 client written here with the h2 library.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import h2.config
import h2.connection
import h2.events
import pytest

from ztproxy.identity import grpcwire, pki
from ztproxy.identity.client import CaClient, CaUnavailable
from ztproxy.identity.renewer import RenewerSettings, run_renewer

TD = "cluster.local"
WEB = pki.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
DB = pki.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")
NODE1 = pki.node_identity(TD, "node1")
MESH = """workloads:
  - {name: web, namespace: shop, serviceAccount: web, node: node1, workloadIps: [10.0.0.1]}
  - {name: db, namespace: shop, serviceAccount: db, node: node2, workloadIps: [10.0.0.2]}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mesh:
    """A CA, a mesh state, and node1's certificate directory holding its node identity."""

    def __init__(self, root: Path, node_ttl: int = 300) -> None:
        self.root = root
        self.ca_dir = root / "ca"
        self.ca = pki.create_ca(str(self.ca_dir))
        self.mesh_state = root / "mesh-state.yaml"
        self.mesh_state.write_text(MESH)
        self.certs = root / "certs"
        self.bundle = self.certs / "root-cert.pem"
        self.certs.mkdir()
        self.bundle.write_text(self.ca.roots_pem)
        self.deny = root / "deny.yaml"
        self.deny.write_text("serials: []\n")
        self.install(NODE1, node_ttl)

    def install(self, identity: pki.SpiffeId, ttl: int, ca: pki.CaMaterial | None = None) -> pki.CertSummary:
        ca = ca or self.ca
        key = pki.generate_key()
        leaf = pki.issue_leaf(ca, key.public_key(), identity, ttl)
        directory = Path(pki.identity_dir(str(self.certs), identity))
        directory.mkdir(parents=True, exist_ok=True)
        pki.write_file(str(directory / "key.pem"), pki.key_pem(key), 0o600)
        pki.write_file(str(directory / "cert-chain.pem"), pki.certs_pem([leaf] + ca.chain), 0o644)
        return pki.summarize(leaf)

    def client(self, port: int, identity: pki.SpiffeId = NODE1) -> CaClient:
        directory = Path(pki.identity_dir(str(self.certs), identity))
        return CaClient(
            addresses=[("127.0.0.1", port)],
            trust_bundle=str(self.bundle),
            client_chain=str(directory / "cert-chain.pem"),
            client_key=str(directory / "key.pem"),
            ca_identity=str(pki.ca_service_identity(TD)),
            timeout=10,
        )


class Signer:
    """One `ztproxy ca serve` process."""

    def __init__(self, mesh: Mesh, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = mesh.root / f"signer-{self.port}.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 -- outlives this method; closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ztproxy.identity",
                "ca",
                "serve",
                "--ca-dir",
                str(mesh.ca_dir),
                "--mesh-state",
                str(mesh.mesh_state),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--deny-list",
                str(mesh.deny),
                "--server-name",
                "ztmesh-ca",
                "--log-level",
                "info",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
        )
        deadline = time.monotonic() + 20
        while "listening on" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"signer did not start:\n{self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def issued(self) -> int:
        return self.text().count(" issued ")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path)


@pytest.fixture
def signers(mesh: Mesh):
    started: List[Signer] = []

    def start() -> Signer:
        started.append(Signer(mesh))
        return started[-1]

    yield start
    for signer in started:
        signer.stop()


def openssl_verify(bundle: Path, chain_file: Path, tmp: Path) -> None:
    certs = pki.load_cert_file(str(chain_file))
    (tmp / "leaf.pem").write_text(pki.cert_pem(certs[0]))
    (tmp / "untrusted.pem").write_text(pki.certs_pem(certs[1:]))
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(bundle),
            "-untrusted",
            str(tmp / "untrusted.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(120)
def test_renewal_at_half_life_across_two_instances_and_failover(mesh: Mesh, signers, tmp_path: Path) -> None:
    first, second = signers(), signers()
    # Each instance serves on its own.
    for signer in (first, second):
        chain = asyncio.run(
            mesh.client(signer.port).create_certificate(pki.make_csr(pki.generate_key(), WEB), 60, str(WEB))
        )
        assert pki.identity_of(pki.load_certs(chain[0])[0]) == WEB and signer.issued() == 1
    # The node certificate lives 6 s so the node identity is renewed too (without impersonation).
    mesh.install(NODE1, 6)
    events: List[Tuple[float, pki.SpiffeId, pki.CertSummary]] = []
    previous: Dict[pki.SpiffeId, pki.CertSummary] = {}
    observed: List[Tuple[pki.SpiffeId, float]] = []  # fraction of the previous lifetime at each renewal

    def on_renewed(identity: pki.SpiffeId, summary: pki.CertSummary) -> None:
        now = pki.utcnow()
        if identity in previous:
            old = previous[identity]
            observed.append((identity, (now - old.not_before).total_seconds() / old.lifetime))
        previous[identity] = summary
        events.append((time.monotonic(), identity, summary))

    settings = RenewerSettings(
        certs_dir=str(mesh.certs),
        trust_bundle=str(mesh.bundle),
        ca_addresses=[("127.0.0.1", first.port), ("127.0.0.1", second.port)],
        node_name="node1",
        cert_ttl=4,
        backoff_initial=0.2,
        backoff_max=1.0,
        reconcile_interval=0.5,
    )

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.ensure_future(run_renewer(settings, lambda: {WEB}, stop, on_renewed))
        while sum(1 for e in events if e[1] == WEB) < 4:
            await asyncio.sleep(0.1)
        first.stop()  # one instance dies: the other one carries on
        killed_at = len(events)
        while sum(1 for e in events[killed_at:] if e[1] == WEB) < 3:
            await asyncio.sleep(0.1)
        stop.set()
        return await asyncio.wait_for(task, 20)

    renewer = asyncio.run(asyncio.wait_for(scenario(), 90))
    web_serials = [e[2].serial for e in events if e[1] == WEB]
    assert len(set(web_serials)) == len(web_serials) >= 7
    assert renewer.renewals[NODE1] >= 2, "the node identity was not renewed"
    fractions = [f for identity, f in observed]
    assert fractions and all(0.45 <= f < 0.9 for f in fractions), fractions  # at half-life, never expired
    assert second.issued() >= 3
    openssl_verify(mesh.bundle, mesh.certs / "shop" / "web" / "cert-chain.pem", tmp_path)
    openssl_verify(mesh.bundle, mesh.certs / "ztmesh-system" / "node-node1" / "cert-chain.pem", tmp_path)


@pytest.mark.timeout(120)
def test_refusals(mesh: Mesh, signers, tmp_path: Path) -> None:
    signer = signers()

    def request(identity: pki.SpiffeId | None, client_identity: pki.SpiffeId = NODE1) -> List[str]:
        csr = pki.make_csr(pki.generate_key(), identity or client_identity)
        return asyncio.run(
            mesh.client(signer.port, client_identity).create_certificate(
                csr, 60, str(identity) if identity else None
            )
        )

    # A foreign identity (a workload of node2) is refused.
    with pytest.raises(
        CaUnavailable, match="node node1 runs no workload with identity .*shop/sa/db.*status 7"
    ):
        request(DB)
    # A workload certificate cannot request certificates.
    mesh.install(WEB, 60)
    with pytest.raises(CaUnavailable, match="is not a node identity"):
        request(WEB, client_identity=WEB)
    assert signer.issued() == 0

    # Removed from the mesh state: no renewal at all; the renewer keeps the installed certificate.
    installed = mesh.install(WEB, 60)
    mesh.mesh_state.write_text(MESH.replace("node: node1", "node: node9"))
    with pytest.raises(CaUnavailable, match="node node1 is not in the mesh state"):
        request(WEB)
    with pytest.raises(CaUnavailable, match="node node1 is not in the mesh state"):
        request(None)
    settings = RenewerSettings(
        certs_dir=str(mesh.certs),
        trust_bundle=str(mesh.bundle),
        ca_addresses=[("127.0.0.1", signer.port)],
        node_name="node1",
        cert_ttl=60,
        renew_fraction=0.0,
        backoff_initial=0.2,
        backoff_max=0.5,
        reconcile_interval=0.2,
    )

    async def short_run():
        stop = asyncio.Event()
        task = asyncio.ensure_future(run_renewer(settings, lambda: {WEB}, stop))
        await asyncio.sleep(2)
        stop.set()
        return await task

    renewer = asyncio.run(short_run())
    assert renewer.failures.get(WEB, 0) >= 2 and not renewer.renewals
    kept = pki.summarize(pki.load_cert_file(str(mesh.certs / "shop/web/cert-chain.pem"))[0])
    assert kept.serial == installed.serial
    mesh.mesh_state.write_text(MESH)
    assert request(WEB)  # back in the mesh state: allowed again

    # Revoked (deny list, by serial, then by node name): the connection is closed before any request.
    node = pki.summarize(pki.load_cert_file(str(mesh.certs / "ztmesh-system/node-node1/cert-chain.pem"))[0])
    mesh.deny.write_text(f"serials: ['{node.serial}']\n")
    time.sleep(1.1)  # the deny list is looked at again at most once a second
    with pytest.raises(
        CaUnavailable, match="closed the connection before answering|may have refused this node.s certificate"
    ):
        request(WEB)
    assert f"serial {node.serial} is on the deny list" in signer.text()
    mesh.deny.write_text("nodes: [node1]\n")
    time.sleep(1.1)
    with pytest.raises(CaUnavailable):
        request(WEB)
    assert "node node1 is on the deny list" in signer.text()
    mesh.deny.write_text("serials: []\n")
    time.sleep(1.1)

    # An expired client certificate is refused by the TLS handshake itself.
    issued_before = signer.issued()
    mesh.install(NODE1, 1)
    time.sleep(1.5)
    with pytest.raises(
        CaUnavailable,
        match="(?i)closed the connection before answering|alert|may have refused this node's certificate",
    ):
        request(WEB)
    # A client certificate from another CA (not in the service's trust bundle) is refused as well.
    other = pki.create_ca(str(tmp_path / "other-ca"))
    mesh.install(NODE1, 60, ca=other)
    with pytest.raises(
        CaUnavailable,
        match="(?i)closed the connection before answering|alert|may have refused this node's certificate",
    ):
        request(WEB)
    assert signer.issued() == issued_before


@pytest.mark.timeout(60)
def test_grpcio_client_interoperates(mesh: Mesh, signers, tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc", reason="grpcio is not installed (optional interop check)")
    signer = signers()
    node_dir = mesh.certs / "ztmesh-system" / "node-node1"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=mesh.bundle.read_bytes(),
        private_key=(node_dir / "key.pem").read_bytes(),
        certificate_chain=(node_dir / "cert-chain.pem").read_bytes(),
    )
    with grpc.secure_channel(
        f"127.0.0.1:{signer.port}", credentials, options=[("grpc.ssl_target_name_override", "ztmesh-ca")]
    ) as channel:
        call = channel.unary_unary(
            grpcwire.PATH, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        key = pki.generate_key()
        answer = call(grpcwire.make_request(pki.make_csr(key, WEB), 600, str(WEB)), timeout=20)
        chain = grpcwire.parse_response(answer)
        assert len(chain) == 3  # leaf, intermediate, root: istiod's layout
        (tmp_path / "chain.pem").write_text("".join(chain[:2]))
        openssl_verify(mesh.bundle, tmp_path / "chain.pem", tmp_path)
        assert pki.key_matches_cert(key, pki.load_certs(chain[0])[0])
        with pytest.raises(grpc.RpcError) as err:
            call(grpcwire.make_request(pki.make_csr(pki.generate_key(), DB), 600, str(DB)), timeout=20)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "runs no workload with identity" in err.value.details()


@pytest.mark.timeout(60)
def test_raw_h2_client_interoperates(mesh: Mesh, signers) -> None:
    """A client written here on h2 and ssl sockets, sharing no code with ztproxy's gRPC client."""
    signer = signers()
    node_dir = mesh.certs / "ztmesh-system" / "node-node1"
    context = ssl.create_default_context(cafile=str(mesh.bundle))
    context.check_hostname = False  # the service is identified by its SPIFFE ID, checked below
    context.load_cert_chain(str(node_dir / "cert-chain.pem"), str(node_dir / "key.pem"))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", signer.port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="ztmesh-ca") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        server = pki.identity_of(pki.x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)))
        assert server == pki.ca_service_identity(TD)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        body = grpcwire.make_request(pki.make_csr(pki.generate_key(), WEB), 300, str(WEB))
        conn.send_headers(
            1,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "ztmesh-ca"),
                (":path", "/istio.v1.auth.IstioCertificateService/CreateCertificate"),
                ("content-type", "application/grpc+proto"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(1, len(body).to_bytes(5, "big") + body, end_stream=True)
        tls.sendall(conn.data_to_send())
        headers: Dict[str, str] = {}
        data = b""
        ended = False
        while not ended:
            chunk = tls.recv(65536)
            assert chunk, "server closed the connection"
            for event in conn.receive_data(chunk):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            tls.sendall(conn.data_to_send())
    assert headers[":status"] == "200" and headers["grpc-status"] == "0"
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5
    chain = grpcwire.parse_response(data[5:])
    assert pki.identity_of(pki.load_certs(chain[0])[0]) == WEB


def test_signer_refuses_to_start_with_bad_ca(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ztproxy.identity",
            "ca",
            "serve",
            "--ca-dir",
            str(tmp_path),
            "--mesh-state",
            str(tmp_path / "mesh.yaml"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
    )
    assert proc.returncode == 1 and "lacks ca-cert.pem" in proc.stderr and "Traceback" not in proc.stderr
