"""Traffic keeps flowing while certificates rotate every few seconds and the CA is rolled.

Two nodes in network namespaces run `ztproxy run` (the data plane); a `ztproxy ca serve` signing
service and one renewer per node (``run_renewer``, the code ztproxy runs) rotate every identity at
half-life, certificates living 6 seconds. A client in workload A opens a new connection to workload B
every 100 ms and keeps one long connection busy the whole time, through HBONE (A's outbound capture,
mTLS between the proxies, B's inbound). Meanwhile the CA is rolled exactly as playbooks/ca-rotate.yml
does it: both roots in every bundle, the signer switched to the new CA, every identity renewed, then
the old root removed. No connection may fail and the long one must survive.

    wA 10.1.0.2 -[wa0/a-w]- nA 10.1.0.1, 10.0.0.1 -[a-b/b-a]- nB 10.0.0.2, 10.2.0.1 -[b-w/wb0]- wB 10.2.0.2
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
from proxy_harness import MeshFiles, stop_process, wait_for_log, workload, ztproxy_cmd, ztproxy_env

from ztproxy.identity import pki
from ztproxy.identity.renewer import RenewerSettings, run_renewer

pytestmark = pytest.mark.timeout(240)

TD = "cluster.local"
CERT_TTL = 6
IDENTITIES = {
    "node-a": pki.SpiffeId.parse("spiffe://cluster.local/ns/frontend/sa/web"),
    "node-b": pki.SpiffeId.parse("spiffe://cluster.local/ns/backend/sa/api"),
}

ECHO_SERVER = """
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.2.0.2", 8080)); srv.listen(128)
def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Runs in workload A until the file `stop` exists; prints one JSON line with what happened.
TRAFFIC_CLIENT = """
import json, os, socket, sys, threading, time
stop, result = sys.argv[1], {"ok": 0, "failed": [], "long_echoes": 0, "long_error": None}
def exchange(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(got), len(payload)))
        got += chunk
    if got != payload:
        raise ValueError("echo mismatch")
def long_connection():
    try:
        with socket.create_connection(("10.2.0.2", 8080), timeout=10) as sock:
            n = 0
            while not os.path.exists(stop):
                exchange(sock, b"long %d " % n * 50)
                n += 1
                result["long_echoes"] = n
                time.sleep(0.2)
    except Exception as exc:
        result["long_error"] = repr(exc)
long = threading.Thread(target=long_connection)
long.start()
i = 0
while not os.path.exists(stop):
    try:
        with socket.create_connection(("10.2.0.2", 8080), timeout=10) as sock:
            exchange(sock, b"short %d" % i)
        result["ok"] += 1
    except Exception as exc:
        result["failed"].append("%.1f %r" % (time.time(), exc))
    i += 1
    time.sleep(0.1)
long.join(15)
print(json.dumps(result), flush=True)
"""


def sh(*argv: str, netns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"


def topology(make_netns) -> Dict[str, str]:
    ns = {name: make_netns(f"zi{name}") for name in ("wA", "nA", "nB", "wB")}
    sh("ip", "-n", ns["nA"], "link", "add", "a-w", "type", "veth", "peer", "name", "wa0", "netns", ns["wA"])
    sh("ip", "-n", ns["nA"], "link", "add", "a-b", "type", "veth", "peer", "name", "b-a", "netns", ns["nB"])
    sh("ip", "-n", ns["nB"], "link", "add", "b-w", "type", "veth", "peer", "name", "wb0", "netns", ns["wB"])
    for netns, dev, cidr in (
        (ns["wA"], "wa0", "10.1.0.2/24"),
        (ns["nA"], "a-w", "10.1.0.1/24"),
        (ns["nA"], "a-b", "10.0.0.1/24"),
        (ns["nB"], "b-a", "10.0.0.2/24"),
        (ns["nB"], "b-w", "10.2.0.1/24"),
        (ns["wB"], "wb0", "10.2.0.2/24"),
    ):
        sh("ip", "-n", netns, "addr", "add", cidr, "dev", dev)
        sh("ip", "-n", netns, "link", "set", dev, "up")
    sh("ip", "-n", ns["wA"], "route", "add", "default", "via", "10.1.0.1")
    sh("ip", "-n", ns["wB"], "route", "add", "default", "via", "10.2.0.1")
    sh("ip", "-n", ns["nA"], "route", "add", "10.2.0.0/24", "via", "10.0.0.2")
    sh("ip", "-n", ns["nB"], "route", "add", "10.1.0.0/24", "via", "10.0.0.1")
    for node in (ns["nA"], ns["nB"]):
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=node)
    # Capture (REDIRECT is enough here: the data plane's own tests cover TPROXY).
    sh(
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-i",
        "a-w",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
        netns=ns["nA"],
    )
    sh(
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-i",
        "b-a",
        "-p",
        "tcp",
        "-d",
        "10.2.0.0/24",
        "--dport",
        "15008",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15008",
        netns=ns["nB"],
    )
    return ns


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install(certs: Path, identity: pki.SpiffeId, ca: pki.CaMaterial, ttl: int) -> None:
    key = pki.generate_key()
    leaf = pki.issue_leaf(ca, key.public_key(), identity, ttl)
    directory = Path(pki.identity_dir(str(certs), identity))
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_file(str(directory / "key.pem"), pki.key_pem(key), 0o600)
    pki.write_file(str(directory / "cert-chain.pem"), pki.certs_pem([leaf] + ca.chain), 0o644)


class Renewers:
    """One renewer per node, in a background event loop (as ztproxy would run it)."""

    def __init__(self, settings: List[RenewerSettings], identities: Dict[str, pki.SpiffeId]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.settings, self.identities = settings, identities
        self.renewed: List[pki.CertSummary] = []
        self.results = []

    def __enter__(self) -> Renewers:
        self.thread.start()

        async def start():
            self.stop = asyncio.Event()
            return [
                asyncio.ensure_future(
                    run_renewer(
                        s,
                        lambda n=s.node_name: {self.identities[n]},
                        self.stop,
                        lambda _i, summary: self.renewed.append(summary),
                    )
                )
                for s in self.settings
            ]

        self.tasks = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        async def finish():
            self.stop.set()
            return await asyncio.gather(*self.tasks)

        self.results = asyncio.run_coroutine_threadsafe(finish(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def all_issued_by(certs_dirs: Dict[str, Path], issuer: pki.CaMaterial) -> bool:
    for node, certs in certs_dirs.items():
        for identity in (IDENTITIES[node], pki.node_identity(TD, node)):
            try:
                leaf = pki.load_cert_file(
                    str(Path(pki.identity_dir(str(certs), identity)) / "cert-chain.pem")
                )[0]
            except pki.IdentityError:
                return False
            if not pki.signed_by(leaf, issuer.signing_cert):
                return False
    return True


def test_traffic_survives_rotations_and_a_ca_roll(make_netns, tmp_path: Path) -> None:
    ns = topology(make_netns)
    old = pki.create_ca(str(tmp_path / "ca-old"))
    new = pki.create_ca(str(tmp_path / "ca-new"))
    # The signing service reads its CA from its own directory, which the roll overwrites (phase 2).
    signer_ca = tmp_path / "signer-ca"
    signer_ca.mkdir(mode=0o700)
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"):
        shutil.copy(tmp_path / "ca-old" / name, signer_ca / name)
    signer_bundle = tmp_path / "signer-trust-bundle.pem"
    signer_bundle.write_text(old.roots_pem)

    state = [
        workload("web", "10.1.0.2", "node-a", namespace="frontend"),
        workload("api", "10.2.0.2", "node-b", namespace="backend"),
    ]
    files: Dict[str, MeshFiles] = {}
    certs_dirs: Dict[str, Path] = {}
    bundles: Dict[str, Path] = {}
    procs: Dict[str, subprocess.Popen] = {}
    logs: Dict[str, Path] = {}
    mesh_state = tmp_path / "mesh-state.yaml"
    port = free_port()
    signer_log = tmp_path / "signer.log"
    signer = None
    server = client = None
    stop_file = tmp_path / "stop-traffic"
    try:
        for node in ("node-a", "node-b"):
            f = MeshFiles(tmp_path / node, node=node)
            files[node], certs_dirs[node] = f, f.certs_dir
            bundles[node] = f.base / "trust-bundle.pem"
            bundles[node].write_text(old.roots_pem)
            install(f.certs_dir, IDENTITIES[node], old, CERT_TTL)
            install(f.certs_dir, pki.node_identity(TD, node), old, CERT_TTL)
            f.write_state(state)
            f.write_settings(
                listen={
                    "outbound": "0.0.0.0:15001",
                    "inbound": "0.0.0.0:15008",
                    "inbound_plaintext": None,
                    "transparent": False,
                },
                preserve_source=False,
                trust_bundle=str(bundles[node]),
                log_level="info",
            )
        shutil.copy(files["node-a"].state_path, mesh_state)
        with open(signer_log, "w") as out:
            signer = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ztproxy.identity",
                    "ca",
                    "serve",
                    "--ca-dir",
                    str(signer_ca),
                    "--mesh-state",
                    str(mesh_state),
                    "--trust-bundle",
                    str(signer_bundle),
                    "--listen",
                    f"127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=out,
                env=ztproxy_env(),
            )
        wait_until(lambda: "listening on" in signer_log.read_text(), 20, "the signing service")
        settings = [
            RenewerSettings(
                certs_dir=str(certs_dirs[node]),
                trust_bundle=str(bundles[node]),
                ca_addresses=[("127.0.0.1", port)],
                node_name=node,
                cert_ttl=CERT_TTL,
                backoff_initial=0.2,
                backoff_max=1.0,
                reconcile_interval=1.0,
            )
            for node in ("node-a", "node-b")
        ]
        # The renewers run first, as in ztproxy, so the data planes start on renewed certificates.
        with Renewers(settings, IDENTITIES) as renewers:
            wait_until(lambda: len(renewers.renewed) >= 4, CERT_TTL * 2, "the first renewals")
            for node, netns in (("node-a", ns["nA"]), ("node-b", ns["nB"])):
                logs[node] = tmp_path / f"{node}.log"
                with open(logs[node], "w") as out:
                    procs[node] = subprocess.Popen(
                        ["ip", "netns", "exec", netns]
                        + ztproxy_cmd("run", "--config", str(files[node].settings_path)),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=ztproxy_env(),
                    )
            for node in procs:
                wait_for_log(procs[node], logs[node], "ztproxy ready")
            server = subprocess.Popen(["ip", "netns", "exec", ns["wB"], sys.executable, "-c", ECHO_SERVER])
            time.sleep(0.5)
            client = subprocess.Popen(
                ["ip", "netns", "exec", ns["wA"], sys.executable, "-c", TRAFFIC_CLIENT, str(stop_file)],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(CERT_TTL * 1.2)  # a couple of rotations under the old CA

            # Phase 1: every bundle (nodes and signer) trusts both roots.
            both = old.roots_pem + new.roots_pem
            for path in list(bundles.values()) + [signer_bundle]:
                pki.write_file(str(path), both, 0o644)
            time.sleep(2)
            # Phase 2: the signer signs with the new CA; renewals move every identity over.
            for name in ("ca-cert.pem", "cert-chain.pem", "root-cert.pem", "ca-key.pem"):
                pki.write_file(str(signer_ca / name), (tmp_path / "ca-new" / name).read_text(), 0o600)
            wait_until(lambda: all_issued_by(certs_dirs, new), CERT_TTL * 3, "every identity on the new CA")
            time.sleep(1.5)  # the data planes reload (reload_interval 0.2 s)
            # Phase 3: the old root leaves every bundle.
            for path in list(bundles.values()) + [signer_bundle]:
                pki.write_file(str(path), new.roots_pem, 0o644)
            time.sleep(CERT_TTL * 1.2)  # more rotations under the new CA alone
            stop_file.write_text("")
            out, _ = client.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in (client, server, signer, *procs.values()):
            if proc is not None:
                stop_process(proc)
    context = (
        "\n".join(f"--- {n} ---\n{logs[n].read_text()[-3000:]}" for n in logs if logs[n].exists())
        + f"\n--- signer ---\n{signer_log.read_text()[-3000:]}"
    )
    assert result["failed"] == [], (
        f"{len(result['failed'])} connections failed: {result['failed'][:5]}\n{context}"
    )
    assert result["ok"] >= 100, result
    assert result["long_error"] is None and result["long_echoes"] >= 50, result
    workload_renewals = [s for s in renewers.renewed if s.identity in {str(i) for i in IDENTITIES.values()}]
    assert len(workload_renewals) >= 8, f"only {len(workload_renewals)} workload renewals\n{context}"
    assert all_issued_by(certs_dirs, new)
    for node in certs_dirs:  # the final state trusts only the new root
        assert pki.load_cert_file(str(bundles[node]))[0] == new.anchor
    assert "certificate for spiffe://cluster.local/ns/frontend/sa/web reloaded" in logs["node-a"].read_text()
