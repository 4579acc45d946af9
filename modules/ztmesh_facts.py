#!/usr/bin/python
"""Ansible module ztmesh_facts: what this host can do for the ztmesh node data plane."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_facts
short_description: Gather the host capabilities the ztmesh node data plane depends on
description:
  - Reports the kernel release, which tunnel kinds the kernel can create, TPROXY and the socket match,
    ipset (kernel and tool), the iptables backend in use (legacy or nf_tables, detected like
    kube-proxy and Calico do), IP forwarding and network namespace support.
  - Capabilities are tested, not guessed from configuration files. Each test runs in a throwaway
    network namespace of its own (a forked child that unshares its network namespace), so gathering
    facts never changes the host; the kernel may load a module on demand, as it would for the real thing.
version_added: "0.1.0"
author:
  - ztmesh contributors (@ztmesh)
requirements:
  - root (the probes create network namespaces)
  - pyroute2 in the Python that runs the module (the ztmesh runtime has it); without it the module fails
    and names the library, not a kernel feature
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
    details: Gathers the same facts; it changes nothing in any mode.
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: none
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: linux
options:
  netns:
    description:
      - Named network namespace (C(/run/netns/<name>)) whose C(ip_forward) and iptables backend are
        reported; default is the task's namespace.
    type: str
notes:
  - Supports check mode (it changes nothing in either mode).
"""

EXAMPLES = r"""
- name: Gather ztmesh facts
  ztmesh_facts:

- name: Stop early on a kernel without Geneve when Geneve is asked for
  ansible.builtin.assert:
    that: ansible_facts.ztmesh.tunnel_kinds[ztmesh_tunnel_kind]
    fail_msg: >-
      This kernel cannot create {{ ztmesh_tunnel_kind }} links; set ztmesh_tunnel_kind to
      {{ 'vxlan' if ztmesh_tunnel_kind == 'geneve' else 'geneve' }}.
"""

RETURN = r"""
ansible_facts:
  description: Facts added to the host.
  returned: always
  type: dict
  contains:
    ztmesh:
      description: Host capabilities for ztmesh.
      returned: always
      type: dict
      contains:
        kernel:
          description: Kernel release (C(uname -r)).
          type: str
          returned: always
          sample: 6.1.0-18-cloud-amd64
        tunnel_kinds:
          description: Whether the kernel can create each tunnel kind.
          type: dict
          returned: always
          sample: {geneve: false, vxlan: true}
        tunnel_kind_errors:
          description: For each kind that cannot be created, the kernel's answer.
          type: dict
          returned: always
          sample: {geneve: "(95, 'Operation not supported')"}
        tproxy:
          description: Whether an iptables TPROXY rule can be installed (C(xt_TPROXY)).
          type: bool
          returned: always
        socket_match:
          description: Whether an iptables C(-m socket --transparent) rule can be installed (C(xt_socket)).
          type: bool
          returned: always
        ipset:
          description: ipset support.
          type: dict
          returned: always
          contains:
            kernel:
              description: Whether the kernel can create a C(hash:ip) set.
              type: bool
              returned: always
            tool:
              description: Whether the C(ipset) command is installed.
              type: bool
              returned: always
            version:
              description: Version of the C(ipset) command, null when missing.
              type: str
              returned: always
              sample: "7.17"
        iptables:
          description: The iptables backend in use.
          type: dict
          returned: always
          contains:
            backend:
              description: C(legacy), C(nft) or C(none) (no iptables installed).
              type: str
              returned: always
              sample: nft
            version:
              description: iptables version.
              type: str
              returned: always
              sample: 1.8.9
            reason:
              description: Why this backend was chosen.
              type: str
              returned: always
              sample: no rules in either backend; iptables 1.8.9 defaults to nft
            save:
              description: Path of the matching C(iptables-save).
              type: str
              returned: always
            restore:
              description: Path of the matching C(iptables-restore).
              type: str
              returned: always
            rule_counts:
              description: Rules found in each backend (-1 when that backend's tools are missing).
              type: dict
              returned: always
              sample: {legacy: 0, nft: 12}
            tables:
              description:
                - Tables each backend lists now (C(*-save)); reading them creates none. The ztmesh_node
                  role records them at first install, so uninstall deletes only the tables ztmesh created.
              type: dict
              returned: always
              sample: {legacy: [], nft: [filter, nat]}
        netns_run_dir:
          description:
            - C(/run/netns), where named network namespaces are mounted. The first C(ip netns add) on a
              host creates it and makes it a shared mount point; uninstall undoes that only when it was
              not there before ztmesh.
          type: dict
          returned: always
          contains:
            exists:
              description: Whether the directory exists.
              type: bool
              returned: always
            mounted:
              description: Whether it is a mount point.
              type: bool
              returned: always
        ip_forward:
          description: Whether C(net.ipv4.ip_forward) is 1 in the namespace.
          type: bool
          returned: always
        netns_supported:
          description: Whether this process can create network namespaces.
          type: bool
          returned: always
"""

import os
import re
import subprocess
import sys

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_backend import detect_iptables_backend, which
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    NETNS_ARGUMENT_SPEC,
    NETNS_RUN_DIR,
    enter_netns_or_fail,
    is_mount_point,
    probe_in_throwaway_netns,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_links import (
    PYROUTE2_IMPORT_ERROR, probe_link_create,
)

# Throwaway test objects: real values of the ztmesh data plane, so "supported" means "ztmesh works".
TUNNEL_PROBES = {
    "geneve": {"geneve_id": 1000, "geneve_remote": "192.0.2.1", "geneve_port": 6081},
    "vxlan": {"vxlan_id": 1000, "vxlan_group": "192.0.2.1", "vxlan_port": 4789},
}
TPROXY_RULE = ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "TPROXY", "--on-port", "15001",
               "--on-ip", "127.0.0.1", "--tproxy-mark", "0x400/0xfff"]
SOCKET_RULE = ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket", "--transparent",
               "-j", "MARK", "--set-xmark", "0x400/0xfff"]
COMMAND_TIMEOUT = 15


def argument_spec() -> dict:
    return dict(NETNS_ARGUMENT_SPEC)


def _run_or_raise(argv: list) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise OSError(proc.returncode, (proc.stderr or proc.stdout).strip())


def probe_command(argv: list) -> bool:
    """Does ``argv`` succeed inside a throwaway namespace?"""
    return probe_in_throwaway_netns(lambda: _run_or_raise(argv)).ok


def tunnel_kinds() -> tuple:
    supported, errors = {}, {}
    for kind, attrs in TUNNEL_PROBES.items():
        result = probe_link_create(kind, attrs)
        supported[kind] = result.ok
        if not result.ok:
            errors[kind] = result.message
    return supported, errors


def ipset_facts() -> dict:
    tool = which("ipset")
    version = None
    if tool:
        proc = subprocess.run([tool, "version"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              check=False)
        match = re.search(r"v(\d+(?:\.\d+)*)", proc.stdout)
        version = match.group(1) if match else None
    kernel = bool(tool) and probe_command([tool, "create", "ztmesh-probe", "hash:ip"])
    return {"kernel": kernel, "tool": bool(tool), "version": version}


def ip_forward() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_forward", encoding="utf-8") as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


def gather() -> dict:
    backend = detect_iptables_backend()
    kinds, kind_errors = tunnel_kinds()
    iptables = backend.iptables
    return {
        "kernel": os.uname().release,
        "tunnel_kinds": kinds,
        "tunnel_kind_errors": kind_errors,
        "tproxy": bool(iptables) and probe_command([iptables, "-w", "5", *TPROXY_RULE]),
        "socket_match": bool(iptables) and probe_command([iptables, "-w", "5", *SOCKET_RULE]),
        "ipset": ipset_facts(),
        "iptables": {key: value for key, value in backend.as_dict().items()
                     if key in ("backend", "version", "reason", "save", "restore", "rule_counts", "tables")},
        "netns_run_dir": {"exists": os.path.isdir(NETNS_RUN_DIR), "mounted": is_mount_point(NETNS_RUN_DIR)},
        "ip_forward": ip_forward(),
        "netns_supported": probe_in_throwaway_netns(lambda: None).ok,
    }


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    if PYROUTE2_IMPORT_ERROR is not None:
        # A missing library is not a missing kernel feature: say which Python lacks it, and the fix.
        module.fail_json(msg=(
            f"{missing_required_lib('pyroute2')} It is missing from {sys.executable} "
            f"({PYROUTE2_IMPORT_ERROR}). playbooks/mesh.yml runs the ztmesh modules with the ztmesh "
            "runtime, which has it: run the modules through mesh.yml (or set ansible_python_interpreter "
            "to /opt/ztmesh/venv/bin/python on an onboarded node)."), exception=PYROUTE2_IMPORT_ERROR)
    enter_netns_or_fail(module)
    module.exit_json(changed=False, ansible_facts={"ztmesh": gather()})


if __name__ == "__main__":
    main()
