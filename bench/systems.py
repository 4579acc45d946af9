"""The systems under test, each run inside the benchmark's own network namespace (loopback only).

Every system forwards client connections to the same two backends (nginx for request/response,
iperf3 for bulk throughput):

- ``plain``:    no proxy, the client talks to the backend directly (the baseline);
- ``ztproxy``:  two real ``ztproxy run`` processes (node A outbound 15001 -> HBONE mTLS + HTTP/2
                CONNECT -> node B inbound 15008), the client's connection captured by an iptables
                REDIRECT in the namespace, exactly as on a node;
- ``stunnel``:  a client-mode stunnel -> TLS 1.3 mTLS -> a server-mode stunnel;
- ``haproxy``:  an HAProxy in TCP mode originating TLS 1.3 mTLS -> an HAProxy terminating it.

All TLS uses the same ECDSA P-256 leaf certificates (SPIFFE URI SANs, an intermediate, one root) and
TLS 1.3 only. The proxies log errors only, so none pays for per-connection log lines.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from pki import CA, Leaf, spiffe_id  # noqa: E402  (the project's test PKI: ECDSA P-256, SPIFFE SANs)

TRUST_DOMAIN = "cluster.local"
# Inside the namespace: the client workload is 127.0.0.1 (the default source on lo), the server
# workload 127.0.0.3. Only connections to 127.0.0.3 are captured, so the other systems, which listen
# and connect on 127.0.0.1, are never touched by the capture rule.
CLIENT_IP = "127.0.0.1"
SERVER_IP = "127.0.0.3"
HTTP_PORT = 8080
IPERF_PORT = 5201
SOCKET_MARK = 0x539
# Listening ports of the tunnels: (client side, server side) per backend port.
TUNNEL_PORTS = {
    "stunnel": {HTTP_PORT: (21080, 22080), IPERF_PORT: (21201, 22201)},
    "haproxy": {HTTP_PORT: (23080, 24080), IPERF_PORT: (23201, 24201)},
}
OPEN_FILES = 20000


class BenchError(Exception):
    """The benchmark cannot run; the message says what to install or fix."""


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, OPEN_FILES)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class Namespace:
    """A throwaway network namespace with lo up and the capture rule for ztproxy's outbound side."""

    def __init__(self, name: str) -> None:
        self.name = name

    def create(self) -> None:
        run(["ip", "netns", "add", self.name])
        self.sh("ip", "link", "set", "lo", "up")
        # As a node's capture: the client workload's connections to the server workload go to the
        # outbound listener; ztproxy's own sockets carry the mark and are never captured again.
        # Port 15008 is left alone so the harness can probe node B's inbound listener directly.
        self.sh("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", CLIENT_IP, "-d", SERVER_IP,
                "!", "--dport", "15008", "-m", "mark", "!", "--mark", hex(SOCKET_MARK),
                "-j", "REDIRECT", "--to-ports", "15001")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def cmd(self, argv: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def sh(self, *argv: str) -> str:
        return run(self.cmd(argv))

    def spawn(self, argv: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None) -> subprocess.Popen:
        # `ip netns exec` execs the command, so the Popen pid is the program itself (RSS, signals).
        out = open(log, "ab")  # noqa: SIM115  (lives as long as the process)
        return subprocess.Popen(self.cmd(argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def run(argv: Sequence[str], timeout: float = 60) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_port(ns: Namespace, host: str, port: int, proc: subprocess.Popen, log: Path,
              timeout: float = 15) -> None:
    """Wait until something in the namespace accepts on host:port (probed with a bash /dev/tcp open)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[4] if len(proc.args) > 4 else proc.args} exited "
                             f"({proc.returncode}):\n{log.read_text(errors='replace')[-2000:]}")
        probe = subprocess.run(ns.cmd(["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]),
                               capture_output=True)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise BenchError(f"nothing accepts on {host}:{port} after {timeout}s:\n"
                     f"{log.read_text(errors='replace')[-2000:]}")


class Pki:
    """One root, one intermediate, a client and a server leaf (ECDSA P-256), written in every layout
    the systems want: chain + key files, and HAProxy's combined PEM."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        root = CA.root("ztmesh bench root")
        inter = root.intermediate("ztmesh bench intermediate")
        self.bundle = root.write_bundle(directory / "root-cert.pem")
        self.leaves: Dict[str, Leaf] = {
            "client": inter.issue(spiffe_id(TRUST_DOMAIN, "bench", "client")),
            "server": inter.issue(spiffe_id(TRUST_DOMAIN, "bench", "server")),
        }
        for name, leaf in self.leaves.items():
            leaf.write(directory / name)
            (directory / f"{name}-combined.pem").write_bytes(leaf.chain_pem() + leaf.key_pem())
            os.chmod(directory / f"{name}-combined.pem", 0o600)

    def chain(self, name: str) -> Path:
        return self.dir / name / "cert-chain.pem"

    def key(self, name: str) -> Path:
        return self.dir / name / "key.pem"

    def combined(self, name: str) -> Path:
        return self.dir / f"{name}-combined.pem"


class System:
    """A tunnel (or none): start(), the address a client uses for a backend port, the proxy pids."""

    name = ""

    def __init__(self, ns: Namespace, workdir: Path, pki: Pki) -> None:
        self.ns = ns
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.procs: List[subprocess.Popen] = []

    def start(self) -> None:
        pass

    def address(self, backend_port: int) -> Tuple[str, int]:
        raise NotImplementedError

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def describe(self) -> str:
        return self.name

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)
        self.procs.clear()

    def _spawn(self, argv: Sequence[str], label: str, env: Optional[Dict[str, str]] = None,
               cwd: Optional[Path] = None) -> subprocess.Popen:
        proc = self.ns.spawn(argv, self.dir / f"{label}.log", env, cwd)
        self.procs.append(proc)
        return proc

    def log(self, label: str) -> Path:
        return self.dir / f"{label}.log"


class Plain(System):
    name = "plain"

    def address(self, backend_port: int) -> Tuple[str, int]:
        return CLIENT_IP, backend_port

    def describe(self) -> str:
        return "no proxy: client -> backend over loopback TCP"


class Ztproxy(System):
    name = "ztproxy"

    def __init__(self, ns: Namespace, workdir: Path, pki: Pki, event_loop: str = "uvloop",
                 src: Path = REPO, name: str = "ztproxy") -> None:
        self.name = name
        super().__init__(ns, workdir, pki)
        self.event_loop = event_loop
        self.src = src

    def describe(self) -> str:
        return (f"two `ztproxy run` processes ({self.event_loop} loop, code from {self.src}): outbound "
                "capture (iptables REDIRECT) -> HBONE (TLS 1.3 mTLS, HTTP/2 CONNECT) -> inbound -> backend")

    def start(self) -> None:
        certs = self.dir / "certs"
        for namespace, sa, leaf in (("bench", "client", "client"), ("bench", "server", "server")):
            self.pki.leaves[leaf].write(certs / namespace / sa)
        state = {
            "workloads": [
                {"uid": "bench/client", "name": "client", "namespace": "bench", "serviceAccount": "client",
                 "workloadIps": [CLIENT_IP], "protocol": "HBONE", "node": "node-a"},
                {"uid": "bench/server", "name": "server", "namespace": "bench", "serviceAccount": "server",
                 "workloadIps": [SERVER_IP], "protocol": "HBONE", "node": "node-b"},
            ],
            "services": [], "policies": [],
        }
        (self.dir / "mesh-state.yaml").write_text(yaml.safe_dump(state))
        env = dict(os.environ, ZTPROXY_EVENT_LOOP=self.event_loop,
                   PYTHONPATH=str(self.src) + (os.pathsep + os.environ["PYTHONPATH"]
                                           if os.environ.get("PYTHONPATH") else ""))
        # Both nodes share the namespace: node B's admin, metrics and readiness servers move up by 1000
        # (they run, as on a real node: telemetry is part of the cost). No DNS proxy.
        for node, listen, ready in (
                ("node-a", {"outbound": f"{CLIENT_IP}:15001", "inbound": None, **_side_ports(0)},
                 (CLIENT_IP, 15001)),
                ("node-b", {"outbound": None, "inbound": f"{SERVER_IP}:15008", **_side_ports(1000)},
                 (SERVER_IP, 15008))):
            settings = {
                "node_name": node, "trust_domain": TRUST_DOMAIN,
                "mesh_state": str(self.dir / "mesh-state.yaml"), "certs_dir": str(certs),
                "trust_bundle": str(self.pki.bundle),
                "listen": dict(listen, inbound_plaintext=None, transparent=False),
                "preserve_source": False, "socket_mark": SOCKET_MARK, "log_level": "warning",
            }
            path = self.dir / f"{node}.yaml"
            path.write_text(yaml.safe_dump(settings))
            # `python -m` puts the working directory first on sys.path: run from the source tree.
            proc = self._spawn([sys.executable, "-m", "ztproxy", "run", "--config", str(path)], node, env,
                               cwd=self.src)
            wait_port(self.ns, ready[0], ready[1], proc, self.log(node))

    def address(self, backend_port: int) -> Tuple[str, int]:
        return SERVER_IP, backend_port


def _side_ports(offset: int) -> Dict[str, Optional[str]]:
    return {"dns": None, "admin": f"127.0.0.1:{15000 + offset}", "metrics": f"127.0.0.1:{15020 + offset}",
            "readiness": f"127.0.0.1:{15021 + offset}"}


class Stunnel(System):
    name = "stunnel"

    def describe(self) -> str:
        return "stunnel4 client -> TLS 1.3 mTLS -> stunnel4 server (thread per connection)"

    def start(self) -> None:
        pki = self.pki
        for side in ("client", "server"):
            lines = ["foreground = yes", "pid =", "debug = err", "syslog = no", ""]
            for backend, (front, back) in TUNNEL_PORTS["stunnel"].items():
                lines += [f"[{side}-{backend}]",
                          f"cert = {pki.chain(side)}", f"key = {pki.key(side)}",
                          f"CAfile = {pki.bundle}", "verifyChain = yes", "sslVersionMin = TLSv1.3"]
                if side == "client":
                    lines += ["client = yes", f"accept = {CLIENT_IP}:{front}",
                              f"connect = {CLIENT_IP}:{back}"]
                else:
                    lines += [f"accept = {CLIENT_IP}:{back}", f"connect = {CLIENT_IP}:{backend}"]
                lines.append("")
            path = self.dir / f"{side}.conf"
            path.write_text("\n".join(lines))
            proc = self._spawn(["stunnel4", str(path)], side)
            for front, back in TUNNEL_PORTS["stunnel"].values():
                wait_port(self.ns, CLIENT_IP, front if side == "client" else back, proc, self.log(side))

    def address(self, backend_port: int) -> Tuple[str, int]:
        return CLIENT_IP, TUNNEL_PORTS["stunnel"][backend_port][0]


class Haproxy(System):
    name = "haproxy"

    def describe(self) -> str:
        return "HAProxy (TCP mode, nbthread 1) originating TLS 1.3 mTLS -> HAProxy terminating it"

    def start(self) -> None:
        pki = self.pki
        for side in ("client", "server"):
            lines = ["global", "  nbthread 1", "  maxconn 8000", "  log stderr local0 err",
                     "  ssl-default-bind-options ssl-min-ver TLSv1.3",
                     "  ssl-default-server-options ssl-min-ver TLSv1.3",
                     "defaults", "  mode tcp", "  timeout connect 10s", "  timeout client 120s",
                     "  timeout server 120s", ""]
            for backend, (front, back) in TUNNEL_PORTS["haproxy"].items():
                if side == "client":
                    lines += [f"listen out-{backend}", f"  bind {CLIENT_IP}:{front}",
                              f"  server s {CLIENT_IP}:{back} ssl crt {pki.combined('client')} "
                              f"ca-file {pki.bundle} verify required", ""]
                else:
                    lines += [f"listen in-{backend}",
                              f"  bind {CLIENT_IP}:{back} ssl crt {pki.combined('server')} "
                              f"ca-file {pki.bundle} verify required",
                              f"  server s {CLIENT_IP}:{backend}", ""]
            path = self.dir / f"{side}.cfg"
            path.write_text("\n".join(lines))
            run(["haproxy", "-c", "-q", "-f", str(path)])
            proc = self._spawn(["haproxy", "-db", "-f", str(path)], side)
            for front, back in TUNNEL_PORTS["haproxy"].values():
                wait_port(self.ns, CLIENT_IP, front if side == "client" else back, proc, self.log(side))

    def address(self, backend_port: int) -> Tuple[str, int]:
        return CLIENT_IP, TUNNEL_PORTS["haproxy"][backend_port][0]


SYSTEMS = {cls.name: cls for cls in (Plain, Ztproxy, Stunnel, Haproxy)}


class Backends:
    """nginx (a tiny fixed response, single worker, no access log) and an iperf3 server."""

    def __init__(self, ns: Namespace, workdir: Path) -> None:
        self.ns = ns
        self.dir = workdir / "backends"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: List[subprocess.Popen] = []

    def start(self) -> None:
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {OPEN_FILES};
pid {self.dir}/nginx.pid;
error_log {self.dir}/nginx-error.log error;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/tmp;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  server {{
    listen 0.0.0.0:{HTTP_PORT} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
        nginx = self.ns.spawn(["nginx", "-c", str(conf), "-e", str(self.dir / "nginx-error.log")],
                              self.dir / "nginx.log")
        self.procs.append(nginx)
        iperf = self.ns.spawn(["iperf3", "-s", "-p", str(IPERF_PORT)], self.dir / "iperf3.log")
        self.procs.append(iperf)
        wait_port(self.ns, CLIENT_IP, HTTP_PORT, nginx, self.dir / "nginx.log")
        wait_port(self.ns, CLIENT_IP, IPERF_PORT, iperf, self.dir / "iperf3.log")

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)
        self.procs.clear()


def require_tools(names: Sequence[str]) -> None:
    import shutil

    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing programs: {', '.join(missing)}; install them with "
                         "`apt-get install stunnel4 haproxy nginx-light iperf3 wrk iptables iproute2`")
    if os.geteuid() != 0:
        raise BenchError("the benchmark creates a network namespace: run it as root")

