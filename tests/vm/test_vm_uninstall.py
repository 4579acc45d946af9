"""uninstall.yml on the VM fleet, then every VM is compared with its snapshot from before mesh.yml:
iptables (both backends) and nft rulesets, ipsets, net.* sysctls, ip rules, routes of all tables,
links, addresses, network namespaces, units and unit files, users and groups, every file with its
hash, and the installed package list (molecule/uninstall/files/snapshot.sh and snapshot-kernel.sh,
run inside the VM; tests/vm/conftest.py `snapshot`)."""

from __future__ import annotations

import difflib

import pytest
from vmtier import FLEET, LOGS, Fleet, playbook_failure, recap, snapshot_all

pytestmark = pytest.mark.timeout(3600)


def sections(text: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    name = "(start)"
    for line in text.splitlines():
        if line.startswith("#### "):
            name = line[5:]
            parts.setdefault(name, "")
            continue
        parts[name] = parts.get(name, "") + line + "\n"
    return parts


def test_uninstall_leaves_every_vm_as_before(fleet: Fleet) -> None:
    fleet.require("mesh")
    for vm in fleet.vms.values():
        vm.ssh("systemctl stop ztmesh-vm-web 2>/dev/null; rm -rf /run/ztmesh-vm-www", check=False)
    # The cloud-init VM too, when it joined (its snapshot is not compared: it had no "before").
    limit = [] if "cloud-init" in fleet.passed else ["--limit", ",".join(FLEET)]
    proc = fleet.playbook("uninstall", "playbooks/uninstall.yml", *limit)
    assert proc.returncode == 0, playbook_failure(proc, "uninstall")
    hosts = recap(proc.stdout)
    assert all(hosts.get(name, {}).get("failed", 1) == 0 for name in FLEET), hosts

    after = snapshot_all([fleet.vms[name] for name in FLEET], "after")
    problems = []
    for name in FLEET:
        before_parts, after_parts = sections(fleet.snapshots_before[name]), sections(after[name])
        # Kernel modules are loaded by the kernel on demand (Geneve, TPROXY, conntrack, ...) and stay
        # loaded: uninstall does not unload modules, which other software may use by then. That section
        # is reported (.cache/vm-logs/snapshot-<vm>-modules-loaded.txt), not compared.
        loaded = set(after_parts.pop("kernel modules", "").split()) - set(
            before_parts.pop("kernel modules", "").split())
        (LOGS / f"snapshot-{name}-modules-loaded.txt").write_text("\n".join(sorted(loaded)) + "\n")
        # A module loaded since registers its own sysctls (nf_conntrack: net.netfilter.*, among them
        # nf_conntrack_*, nf_flowtable_*, nf_hooks_lwtunnel, and net.nf_conntrack_max). Those keys, new
        # since the first snapshot, are the module's and are left out; every key that existed before
        # must still have its value.
        before_keys = {line.split(" = ")[0] for line in before_parts.get("sysctl net.*", "").splitlines()}
        module_keys = [line for line in after_parts.get("sysctl net.*", "").splitlines()
                       if line.split(" = ")[0] not in before_keys and "nf_conntrack" in loaded
                       and line.startswith(("net.netfilter.", "net.nf_conntrack_max"))]
        kept = [line for line in after_parts.get("sysctl net.*", "").splitlines() if line not in module_keys]
        after_parts["sysctl net.*"] = "".join(line + "\n" for line in kept)
        diff = list(difflib.unified_diff(
            [f"{s}: {line}" for s, body in before_parts.items() for line in body.splitlines()],
            [f"{s}: {line}" for s, body in after_parts.items() for line in body.splitlines()],
            f"{name} before mesh.yml", f"{name} after uninstall.yml", lineterm="", n=1))
        if diff:
            (LOGS / f"snapshot-{name}.diff").write_text("\n".join(diff) + "\n")
            problems.append("\n".join(diff[:80]))
    assert not problems, "snapshots differ (.cache/vm-logs/snapshot-*.diff):\n" + "\n\n".join(problems)
