"""Three baseline VMs (the distribution's cloud kernel, reached over SSH) onboarded by mesh.yml with the
inventory's defaults, so Geneve tunnels, in the air-gapped mode (every package from the controller):
a second run changes nothing, mesh traffic crosses the VM network through HBONE with both identities
in the access log and only TLS on the wire, a DENY is refused for its cause (401 and the
authorization log line), and a rebooted VM comes back, data plane and ztproxy, without Ansible."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import subprocess
import sys
import time

import pytest
from vmtier import LOGS, REPO, Fleet, playbook_failure, recap, timed

PCAP_CHECK = REPO / "molecule" / "fleet" / "files" / "pcap_check.py"
WWW = "/run/ztmesh-vm-www"
pytestmark = pytest.mark.timeout(3600)


def serve(vm, body: str) -> None:
    """A plain web server on the VM's workload port 8080 (python3 of the baseline, a transient unit
    of the test, stopped before the snapshot): /whoami answers body."""
    vm.ssh(f"mkdir -p {WWW} && printf '%s' '{body}' > {WWW}/whoami && "
           f"(systemctl is-active -q ztmesh-vm-web || systemd-run --quiet --unit ztmesh-vm-web "
           f"python3 -m http.server 8080 --bind {vm.address} --directory {WWW})")
    for _ in range(30):
        if vm.ssh(f"python3 -c \"import socket; socket.create_connection(('{vm.address}', 8080), 2)\"",
                  check=False).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{vm.name}: the test web server does not listen: "
                         + vm.ssh("journalctl -u ztmesh-vm-web --no-pager | tail -20", check=False).stdout)


def fetch(vm, url: str, timeout: int = 15) -> subprocess.CompletedProcess:
    """GET url from the VM with the baseline's python3 (a client of the VM's host workload)."""
    code = ("import sys, urllib.request\n"
            f"print(urllib.request.urlopen(\"{url}\", timeout={timeout}).read().decode())\n")
    return vm.ssh(f"python3 -c '{code}'", check=False, timeout=timeout + 60)


def journal(vm, unit: str = "ztproxy", since: str | None = None) -> str:
    since_arg = f" --since '{since}'" if since else ""
    return vm.ssh(f"journalctl -u {unit} -b --no-pager -o cat{since_arg}", timeout=120).stdout


def access_lines(log: str, src: str, dst: str) -> list[str]:
    return [line for line in log.splitlines()
            if "connection complete" in line
            and re.search(r'src\.identity="?spiffe://cluster\.local/ns/shop/sa/' + src + r'\b', line)
            and re.search(r'dst\.identity="?spiffe://cluster\.local/ns/shop/sa/' + dst + r'\b', line)]


def test_mesh_onboards_baseline_vms(fleet: Fleet) -> None:
    proc = fleet.playbook("mesh-1", "playbooks/mesh.yml")
    assert proc.returncode == 0, playbook_failure(proc, "mesh-1")
    hosts = recap(proc.stdout)
    for name in fleet.vms:
        assert hosts.get(name, {}).get("failed", 1) == 0 and hosts[name]["unreachable"] == 0, hosts
    for vm in fleet.vms.values():
        # The default tunnel kind on the real kernel; the runtime and the packages brought by mesh.yml.
        links = vm.ssh("ip -d link show istioin; ip -d link show istioout").stdout
        assert links.count("geneve id") == 2, f"{vm.name}: {links}"
        vm.ssh("test -x /opt/ztmesh/venv/bin/python && test -s /opt/ztmesh/installed-packages")
        assert vm.ssh("systemctl is-active ztproxy ztmesh-dataplane", check=False).stdout.split() == \
            ["active", "active"]
    fleet.passed.add("mesh")


def test_second_run_changes_nothing(fleet: Fleet) -> None:
    fleet.require("mesh")
    proc = fleet.playbook("mesh-2", "playbooks/mesh.yml")
    assert proc.returncode == 0, playbook_failure(proc, "mesh-2")
    hosts = recap(proc.stdout)
    changed = {name: hosts.get(name, {}).get("changed") for name in fleet.vms}
    assert changed == {name: 0 for name in fleet.vms}, (
        f"changed per host: {changed}\n"
        + "\n".join(line for line in proc.stdout.splitlines() if line.startswith("changed:"))[-4000:])
    fleet.passed.add("idempotent")


def test_hbone_traffic_with_both_identities_and_only_tls_on_the_wire(fleet: Fleet) -> None:
    fleet.require("mesh")
    vm1, vm2 = fleet.vms["vm1"], fleet.vms["vm2"]
    secret = f"ztmesh-vm-wire-secret-{secrets.token_hex(8)}"
    serve(vm2, f"web@vm2 {secret}")
    pcap = LOGS / "mesh.pcap"
    dump = subprocess.Popen(["tcpdump", "-i", fleet.network.bridge, "-nn", "-U", "-w", str(pcap),
                             "tcp port 8080 or tcp port 15008"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(2)
        with timed("traffic vm1 -> vm2"):
            got = fetch(vm1, f"http://{vm2.address}:8080/whoami")
        time.sleep(2)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=30)
    assert got.returncode == 0 and got.stdout.strip() == f"web@vm2 {secret}", got.stdout + got.stderr
    wire = json.loads(subprocess.run([sys.executable, str(PCAP_CHECK), str(pcap), secret],
                                     capture_output=True, text=True, check=True).stdout)
    assert wire["port_8080"] == 0 and wire["port_15008"] > 0 and wire["tls_records"] > 0 \
        and not wire["secret_seen"], f"on the bridge between the VMs: {wire} ({pcap})"
    # Both identities: the server's proxy (inbound) and the client's proxy (outbound) log the pair.
    for vm in (vm2, vm1):
        deadline = time.monotonic() + 30
        while not (lines := access_lines(journal(vm), "client", "web")) and time.monotonic() < deadline:
            time.sleep(2)
        assert lines, f"{vm.name}: no access log line with both identities:\n{journal(vm)[-3000:]}"
    fleet.passed.add("traffic")


def test_deny_is_refused_for_its_cause(fleet: Fleet) -> None:
    fleet.require("mesh")
    vm1, vm2, vm3 = (fleet.vms[name] for name in ("vm1", "vm2", "vm3"))
    serve(vm3, "db@vm3")
    denied = fetch(vm1, f"http://{vm3.address}:8080/whoami")
    assert denied.returncode != 0, f"client -> db was not refused: {denied.stdout}"
    # The same server from another identity is served: the policy blocks exactly its pair.
    allowed = fetch(vm2, f"http://{vm3.address}:8080/whoami")
    assert allowed.returncode == 0 and allowed.stdout.strip() == "db@vm3", allowed.stdout + allowed.stderr
    # The cause: vm3's proxy refused the HBONE CONNECT with 401 naming the policy, and vm1's proxy
    # reports the 401 answer of its CONNECT.
    deadline = time.monotonic() + 30
    while True:
        server_log, client_log = journal(vm3), journal(vm1)
        refused = [line for line in server_log.splitlines()
                   if "refused with 401" in line and "authorization denied" in line
                   and "client" in line]
        answered = [line for line in client_log.splitlines()
                    if re.search(rf"HBONE CONNECT {re.escape(vm3.address)}:8080 via \S+ answered 401", line)]
        if (refused and answered) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert refused, f"vm3: no 401 authorization refusal in the log:\n{server_log[-3000:]}"
    assert "no-client-to-db" in refused[-1], f"the refusal does not name the DENY policy: {refused[-1]}"
    assert answered, f"vm1: no 'answered 401' for its CONNECT in the log:\n{client_log[-3000:]}"
    fleet.passed.add("deny")


def test_reboot_restores_data_plane_and_ztproxy_without_ansible(fleet: Fleet) -> None:
    fleet.require("mesh")
    vm1, vm2 = fleet.vms["vm1"], fleet.vms["vm2"]
    before = vm2.boot_id()
    with timed("reboot vm2 (to systemd running)"):
        with contextlib.suppress(subprocess.TimeoutExpired):  # the connection may go down with the VM
            vm2.ssh("systemctl reboot", check=False, timeout=30)
        vm2.wait_ssh(not_boot=before)
        state = vm2.wait_running()
    assert state == "running", f"vm2 after reboot: {state}\n{vm2.console_tail()}"
    links = vm2.ssh("ip -d link show istioin; ip netns list; ip rule").stdout
    assert links.count("geneve id") == 1 and "ztproxy" in links, links
    assert vm2.ssh("systemctl is-active ztproxy ztmesh-dataplane", check=False).stdout.split() == \
        ["active", "active"]
    ready = ""
    for _ in range(60):
        ready = vm2.ssh("ip netns exec ztproxy python3 -c \"import urllib.request; print(urllib.request."
                        "urlopen('http://127.0.0.1:15021/healthz/ready', timeout=3).status)\"",
                        check=False).stdout.strip()
        if ready == "200":
            break
        time.sleep(2)
    assert ready == "200", f"ztproxy not ready after the reboot:\n{journal(vm2)[-3000:]}"
    serve(vm2, "web@vm2 after reboot")
    got = fetch(vm1, f"http://{vm2.address}:8080/whoami")
    assert got.returncode == 0 and got.stdout.strip() == "web@vm2 after reboot", got.stdout + got.stderr
    deadline = time.monotonic() + 30
    while not access_lines(journal(vm2), "client", "web") and time.monotonic() < deadline:
        time.sleep(2)
    assert access_lines(journal(vm2), "client", "web"), journal(vm2)[-3000:]
    fleet.passed.add("reboot")
