#!/usr/bin/env python3
"""Read the ztmesh objects of this node into one JSON document for the verify playbooks.

Reading everything in one run keeps verification to one task per node (each task over the podman
connection costs seconds); the assertions are then made on the controller. Only reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

PROXY_NETNS = "ztproxy"
UNITS = ("ztproxy.service", "ztmesh-dataplane.service")
UNIT_PROPERTIES = ("ActiveState", "SubState", "UnitFileState", "MainPID", "User", "Group", "NoNewPrivileges",
                   "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem", "NetworkNamespacePath",
                   "Requires", "After", "Restart")
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/conf/istioin/rp_filter", "net/ipv4/conf/istioout/rp_filter",
           "net/ipv4/conf/istioin/accept_local", "net/ipv4/conf/istioout/accept_local",
           "net/ipv4/conf/all/rp_filter")


def run(argv: List[str], netns: Optional[str] = None) -> subprocess.CompletedProcess:
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    return subprocess.run(argv, capture_output=True, text=True)


def ip_json(args: List[str], netns: Optional[str] = None) -> Any:
    proc = run(["ip", "-j", "-d"] + args, netns)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []


def links(netns: Optional[str] = None) -> Dict[str, dict]:
    result = {}
    for link in ip_json(["addr", "show"], netns):
        info = link.get("linkinfo", {})
        data = info.get("info_data", {})
        result[link["ifname"]] = {
            "kind": info.get("info_kind", ""),
            "vni": data.get("id"),
            "remote": data.get("remote"),
            "port": data.get("port"),
            "up": "UP" in link.get("flags", []),
            "mtu": link.get("mtu"),
            "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                          if a.get("family") == "inet"],
        }
    return result


def iptables(netns: Optional[str] = None) -> Dict[str, Dict[str, List[str]]]:
    """Both backends' rules, per table (the roles use the backend the node uses; the other stays empty)."""
    out: Dict[str, Dict[str, List[str]]] = {}
    for backend in ("legacy", "nft"):
        tables: Dict[str, List[str]] = {}
        current = None
        for line in run([f"iptables-{backend}-save"], netns).stdout.splitlines():
            if line.startswith("*"):
                current = tables.setdefault(line[1:], [])
            elif current is not None and not line.startswith(("#", "COMMIT")):
                current.append(line)
        out[backend] = tables
    return out


def unit(name: str) -> Dict[str, str]:
    proc = run(["systemctl", "show", name, "--property=" + ",".join(UNIT_PROPERTIES)])
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def process(pid: int) -> Dict[str, Any]:
    if pid <= 0:
        return {}
    status = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                status[key] = value.strip()
    except OSError:
        return {}
    netns = run(["ip", "netns", "identify", str(pid)]).stdout.strip()
    return {"netns": netns, "uid": int(status["Uid"].split()[0]), "cap_eff": int(status["CapEff"], 16),
            "cap_bnd": int(status["CapBnd"], 16), "no_new_privs": status.get("NoNewPrivs") == "1",
            "user": run(["id", "-nu", status["Uid"].split()[0]]).stdout.strip()}


def sysctls() -> Dict[str, Optional[str]]:
    values = {}
    for key in SYSCTLS:
        try:
            with open(f"/proc/sys/{key}") as handle:
                values[key.replace("/", ".")] = handle.read().strip()
        except OSError:
            values[key.replace("/", ".")] = None
    return values


def certificates(certs_dir: str = "/var/lib/ztproxy/certs") -> List[Dict[str, Any]]:
    """Each identity's certificate as openssl (an independent implementation) sees it: the URI SAN,
    whether it is valid now, whether its chain verifies against the trust bundle, the key's mode."""
    bundle = os.path.join(certs_dir, "root-cert.pem")
    found = []
    for namespace in sorted(os.listdir(certs_dir)) if os.path.isdir(certs_dir) else []:
        for account in sorted(os.listdir(os.path.join(certs_dir, namespace))) \
                if os.path.isdir(os.path.join(certs_dir, namespace)) else []:
            base = os.path.join(certs_dir, namespace, account)
            chain, key = os.path.join(base, "cert-chain.pem"), os.path.join(base, "key.pem")
            san = run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", chain]).stdout
            parts = [part.strip() for part in san.replace("\n", ",").split(",")]
            uris = [part[4:] for part in parts if part.startswith("URI:")]
            valid_now = run(["openssl", "x509", "-noout", "-checkend", "0", "-in", chain]).returncode == 0
            # The leaf is verified with the rest of cert-chain.pem as intermediates.
            verify = run(["openssl", "verify", "-CAfile", bundle, "-untrusted", chain, chain])
            verified = verify.returncode == 0
            found.append({"path": base, "identity": uris[0] if len(uris) == 1 else uris,
                          "status": "valid" if valid_now and verified else "invalid",
                          "key_mode": oct(os.stat(key).st_mode & 0o777) if os.path.exists(key) else None})
    return found


def main() -> int:
    netns_list = run(["ip", "netns", "list"]).stdout.split()
    in_proxy = PROXY_NETNS in netns_list
    ready = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                 "http://127.0.0.1:15021/healthz/ready"], PROXY_NETNS) if in_proxy else None
    units = {name: unit(name) for name in UNITS}
    venv = "/opt/ztmesh/venv/bin/ztproxy"
    check = run([venv, "check", "--config", "/etc/ztproxy/ztproxy.yaml"]) if os.path.exists(venv) else None
    ipset = run(["ipset", "list", "ztunnel-pods-ips", "-o", "save"])
    report = {
        "netns": netns_list,
        "links": links(),
        "proxy_links": links(PROXY_NETNS) if in_proxy else {},
        "ipset": sorted(line.split()[2] for line in ipset.stdout.splitlines() if line.startswith("add ")),
        "ipset_exists": ipset.returncode == 0,
        "iptables": iptables(),
        "proxy_iptables": iptables(PROXY_NETNS) if in_proxy else {},
        "rules": ip_json(["rule", "show"]),
        "proxy_rules": ip_json(["rule", "show"], PROXY_NETNS) if in_proxy else [],
        "routes": {str(t): ip_json(["route", "show", "table", str(t)]) for t in (100, 101, 102)},
        "proxy_routes": {"100": ip_json(["route", "show", "table", "100"], PROXY_NETNS) if in_proxy else [],
                         "main": ip_json(["route", "show"], PROXY_NETNS) if in_proxy else []},
        "sysctls": sysctls(),
        "units": units,
        "proxy_process": process(int(units["ztproxy.service"].get("MainPID", "0") or 0)),
        "ready": ready.stdout if ready is not None else None,
        "check": {"rc": check.returncode, "out": check.stdout + check.stderr} if check else None,
        "certs": {"identities": certificates()},
    }
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
