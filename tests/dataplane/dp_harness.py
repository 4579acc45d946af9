"""Harness of tests/netns/test_dataplane_*.py: simulated nodes as network namespaces, the ztmesh_node role
applied to them with ansible-playbook, real packets, and snapshots of every kernel object.

Topology (addresses exist only inside these namespaces)::

    ext (10.123.0.9) ──┐
    node1 eth0 10.123.0.1 ── ul: bridge br0 ── node2 eth0 10.123.0.2
      └ cbr0 10.124.1.1/24 ── c1 10.124.1.2      └ cbr0 10.124.2.1/24 ── c2 10.124.2.2

Each node gets its own proxy namespace (``<prefix>-pN``) and data plane directory, and its host
address and its contained workload are enrolled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
PLAYBOOK = HERE / "node.yml"
UNDERLAY = "10.123.0"
EXT_IP = f"{UNDERLAY}.9"


def sh(*argv: str, ns: Optional[str] = None, check: bool = True, timeout: int = 60,
       stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Node:
    index: int
    ns: str
    proxy_ns: str
    contained_ns: str
    workdir: Path
    extra_vars: Dict = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return f"{UNDERLAY}.{self.index}"

    @property
    def contained_ip(self) -> str:
        return f"10.124.{self.index}.2"

    @property
    def dp_dir(self) -> Path:
        return self.workdir / f"dataplane-{self.index}"

    def role_vars(self) -> Dict:
        unit_dir = self.workdir / f"units-{self.index}"
        unit_dir.mkdir(parents=True, exist_ok=True)
        base = {
            "ztmesh_node_netns": self.ns,
            "ztmesh_proxy_netns": self.proxy_ns,
            "ztmesh_tunnel_kind": "vxlan",
            "ztmesh_dataplane_dir": str(self.dp_dir),
            "ztmesh_systemd_unit_dir": str(unit_dir),
            "ztmesh_dataplane_manage_service": False,
            "ztmesh_host_workload_addresses": [self.ip],
            "ztmesh_contained_workload_addresses": [self.contained_ip],
        }
        base.update(self.extra_vars)
        return base


class Topology:
    """Namespaces of one test module; ``close()`` removes every one of them."""

    def __init__(self, prefix: str, nodes: int = 2) -> None:
        self.prefix = prefix
        self.created: List[str] = []
        self.procs: List[subprocess.Popen] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.ul = self._netns("ul")
        self.ext = self._netns("ext")
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.ul)
        sh("ip", "link", "set", "br0", "up", ns=self.ul)
        self._plug(self.ext, "ext", EXT_IP)
        self.nodes = [self._node(i) for i in range(1, nodes + 1)]
        for node in self.nodes:
            sh("ip", "route", "add", f"10.124.{node.index}.0/24", "via", node.ip, ns=self.ext)
            for other in self.nodes:
                if other is not node:
                    sh("ip", "route", "add", f"10.124.{other.index}.0/24", "via", other.ip, ns=node.ns)

    def _netns(self, tag: str) -> str:
        name = f"{self.prefix}-{tag}"
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        return name

    def _plug(self, ns: str, port: str, ip: str) -> None:
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.ul)
        sh("ip", "link", "set", port, "master", "br0", "up", ns=self.ul)
        sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)

    def _node(self, index: int) -> Node:
        ns = self._netns(f"n{index}")
        cns = self._netns(f"c{index}")
        node = Node(index=index, ns=ns, proxy_ns=f"{self.prefix}-p{index}", contained_ns=cns,
                    workdir=self.workdir)
        self.created.append(node.proxy_ns)  # created by the role; removed here if a test fails midway
        self._plug(ns, f"n{index}", node.ip)
        sh("ip", "link", "add", "cbr0", "type", "bridge", ns=ns)
        sh("ip", "addr", "add", f"10.124.{index}.1/24", "dev", "cbr0", ns=ns)
        sh("ip", "link", "set", "cbr0", "up", ns=ns)
        sh("ip", "link", "add", "vc0", "type", "veth", "peer", "name", "eth0", "netns", cns, ns=ns)
        sh("ip", "link", "set", "vc0", "master", "cbr0", "up", ns=ns)
        sh("ip", "addr", "add", f"{node.contained_ip}/24", "dev", "eth0", ns=cns)
        sh("ip", "link", "set", "eth0", "up", ns=cns)
        sh("ip", "route", "add", "default", "via", f"10.124.{index}.1", ns=cns)
        return node

    def start(self, ns: str, script: str, *args: str) -> subprocess.Popen:
        """Start a helper (relay.py, server.py) in a namespace and wait for its 'ready' line."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, str(HERE / script), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"{script} {args} did not start: {line}{proc.stderr.read()}")
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait(timeout=10)
        self.procs.remove(proc)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def run_role(node: Node, action: str = "apply", check: bool = False, diff: bool = False,
             extra: Optional[Dict] = None, timeout: int = 300) -> Dict:
    """ansible-playbook tests/dataplane/node.yml on one node; returns the stats and the task results."""
    variables = dict(node.role_vars(), ztmesh_dp_action=action, **(extra or {}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_STDOUT_CALLBACK="json",
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_PYTHON_INTERPRETER=PYTHON,
               ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_NOCOLOR="1")
    argv = [str(Path(PYTHON).parent / "ansible-playbook"), "-i", "localhost,", str(PLAYBOOK),
            "-e", json.dumps(variables)]
    argv += ["--check"] if check else []
    argv += ["--diff"] if diff else []
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    try:
        out = json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(f"ansible-playbook gave no JSON (rc={proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}") from exc
    tasks = [(t["task"]["name"], t["hosts"].get("localhost", {})) for p in out["plays"] for t in p["tasks"]]
    stats = out["stats"]["localhost"]
    failed = [(name, r.get("msg") or r.get("results")) for name, r in tasks if r.get("failed")]
    if stats.get("failures") or stats.get("unreachable"):
        raise AssertionError(f"role {action} failed on {node.ns}: {failed}")
    return {"stats": stats, "tasks": tasks,
            "changed_tasks": [name for name, r in tasks if r.get("changed")]}


# ---------------------------------------------------------------------------------------------------
# Snapshots: every object the role could touch, in a form that is stable across runs.

# Tunnel attributes that identify a link (the rest of info_data: timers and counters of bridges).
_TUNNEL_KINDS = ("vxlan", "geneve")


def _links(ns: str) -> List[str]:
    """Name, kind, MTU, admin state, master and, for tunnels, every kernel attribute of each link."""
    out = []
    for link in json.loads(sh("ip", "-d", "-j", "link", "show", ns=ns).stdout):
        info = link.get("linkinfo", {})
        kind = info.get("info_kind")
        out.append(json.dumps({
            "ifname": link["ifname"], "kind": kind, "mtu": link.get("mtu"), "master": link.get("master"),
            "up": "UP" in link.get("flags", []),
            "data": info.get("info_data") if kind in _TUNNEL_KINDS else None,
        }, sort_keys=True))
    return sorted(out)


def _sorted_members(listing: List[str]) -> List[str]:
    """Members print in hash order, which depends on the set's random seed: sort them per set."""
    out: List[str] = []
    members: List[str] = []
    in_members = False
    for line in listing + ["Name: "]:
        if line.startswith("Name: "):
            out += sorted(members)
            members, in_members = [], False
        if in_members and line.strip():
            members.append(line)
        else:
            out.append(line)
        in_members = in_members or line.startswith("Members:")
    return out[:-1]


def snapshot(ns: str) -> Dict[str, object]:
    """iptables (both backends), ip rules, every route table, IPv4 addresses, links, ipsets, sysctls."""
    def lines(*argv: str) -> List[str]:
        return sh(*argv, ns=ns).stdout.splitlines()

    iptables = {}
    for backend in ("nft", "legacy"):
        save = sh(f"iptables-{backend}-save", ns=ns, check=False).stdout
        iptables[backend] = [line.split(" [")[0] if line.startswith(":") else line
                             for line in save.splitlines() if not line.startswith("#")]
    routes = [line for line in lines("ip", "route", "show", "table", "all") if "fe80:" not in line
              and not line.startswith("multicast ")]
    ipset = [line for line in lines("ipset", "list")
             if not line.startswith(("Size in memory", "References"))]
    # the header's initval is random per set
    ipset = [" ".join(w for w in line.split() if not w.startswith("0x")) if line.startswith("Header")
             else line for line in ipset]
    ipset = _sorted_members(ipset)
    sysctl = lines("sysctl", "-a", "--pattern", r"^net\.ipv4\.(ip_forward|conf\.)")
    return {"iptables": iptables, "rules": lines("ip", "rule", "show"), "routes": routes,
            "addresses": sorted(line.split(": ", 1)[1] for line in lines("ip", "-4", "-o", "addr", "show")),
            "links": _links(ns), "ipset": ipset, "sysctl": sysctl}


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


# ---------------------------------------------------------------------------------------------------
# Clients: one connection or datagram from inside a namespace.

_TCP_CLIENT = """
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    data = b""
    while not data.endswith(b"\\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.decode().strip() or "EMPTY")
except socket.timeout:
    print("TIMEOUT")
except OSError as exc:
    print(f"ERROR {exc.strerror}")
"""

_UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(float(sys.argv[3]))
# Connected, as a resolver's socket is: only an answer from the address asked is received.
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"ping")
try:
    print(s.recv(4096).decode().strip())
except socket.timeout:
    print("TIMEOUT")
except OSError as exc:  # an ICMP error reported on the connected socket
    print(f"ERROR {exc.__class__.__name__}")
"""


_PING = """
import os, socket, struct, sys
def csum(b):
    b += b"\\0" * (len(b) % 2)
    t = sum(struct.unpack(f"!{len(b) // 2}H", b)); t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(float(sys.argv[2]))
ident = os.getpid() & 0xffff
hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ztmesh"
s.sendto(hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:], (sys.argv[1], 0))
try:
    while True:
        data, peer = s.recvfrom(2048)
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            print(f"REPLY {peer[0]}"); break
except socket.timeout:
    print("TIMEOUT")
"""


def ping(ns: str, ip: str, timeout: float = 3.0) -> str:
    """One ICMP echo (raw socket: no ping binary needed); 'REPLY <ip>' or 'TIMEOUT'."""
    return sh(PYTHON, "-c", _PING, ip, str(timeout), ns=ns, timeout=30).stdout.strip()


def tcp(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    return sh(PYTHON, "-c", _TCP_CLIENT, ip, str(port), str(timeout), ns=ns, timeout=30).stdout.strip()


def udp(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    return sh(PYTHON, "-c", _UDP_CLIENT, ip, str(port), str(timeout), ns=ns, timeout=30).stdout.strip()


def relay_log(path: Path) -> List[Dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
