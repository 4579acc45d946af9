#!/usr/bin/python
"""Ansible module ztmesh_tunnel: one Geneve or VXLAN link, kept exactly as declared."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_tunnel
short_description: Manage a Geneve or VXLAN tunnel link of the ztmesh node data plane
description:
  - Creates, repairs or deletes one point-to-point Geneve or VXLAN link through netlink (pyroute2),
    such as C(istioin)/C(istioout) on the node and C(pistioin)/C(pistioout) in the proxy namespace.
  - The link's kind, VNI, remote, UDP port and (VXLAN) local address identify the tunnel; the kernel
    cannot change them in place, so a same-named link that differs is recreated (O(force=true)) or
    refused (O(force=false)). Address, MTU and up/down state are repaired in place.
  - Before creating a link the module creates the same link in a throwaway network namespace. A kernel
    without the kind (for example one built without C(CONFIG_GENEVE)) or a value the kernel rejects
    fails the task before anything on the node changes.
  - Only links of kind C(geneve) or C(vxlan) are ever deleted; a same-named link of another kind (a
    NIC, a bridge) makes the task fail instead.
version_added: "0.1.0"
author:
  - ztmesh contributors (@ztmesh)
requirements:
  - pyroute2 on the managed node
  - root (CAP_NET_ADMIN, and CAP_SYS_ADMIN to enter O(netns))
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
    details: Shows the link's attributes before and after.
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: linux
options:
  name:
    description: Link name, at most 15 characters.
    type: str
    required: true
  kind:
    description:
      - Tunnel kind. Use C(vxlan) on kernels built without C(CONFIG_GENEVE).
    type: str
    choices: [geneve, vxlan]
    default: geneve
  vni:
    description: Virtual network identifier, 0 to 16777215. Required when O(state=present).
    type: int
  remote:
    description: IPv4 unicast address of the far end. Required when O(state=present).
    type: str
  local:
    description: IPv4 source address of the encapsulated packets. Only for O(kind=vxlan).
    type: str
  port:
    description:
      - UDP destination port of the encapsulation.
      - Defaults to 6081 for Geneve and 4789 (the IANA port, not the kernel's legacy 8472) for VXLAN.
    type: int
  address:
    description:
      - IPv4 address with prefix length (C(192.168.126.1/30)) of the link, kept exact (other IPv4
        addresses on the link are removed). Omit to leave the link's addresses alone.
    type: str
  mtu:
    description: MTU of the link, 68 to 65535. Omit to keep the kernel's choice.
    type: int
  link_state:
    description: Administrative state of the link.
    type: str
    choices: [up, down]
    default: up
  force:
    description:
      - When a link with this name exists as a Geneve or VXLAN link with another kind, VNI, remote,
        port or local address, delete and recreate it (V(true)) or fail naming the differences (V(false)).
    type: bool
    default: true
  state:
    description: C(present) creates or repairs the link; C(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  netns:
    description:
      - Named network namespace (C(/run/netns/<name>)) to act in; default is the namespace of the task.
    type: str
notes:
  - Supports check mode and diff mode. The probe in a throwaway namespace also runs in check mode, so
    check mode reports a missing kernel feature too.
"""

EXAMPLES = r"""
- name: Inbound tunnel from the node to the proxy namespace
  ztmesh_tunnel:
    name: istioin
    kind: "{{ ztmesh_tunnel_kind }}"
    vni: 1000
    remote: 192.168.125.2
    address: 192.168.126.1/30
    mtu: 1450

- name: Same tunnel inside the proxy namespace, VXLAN with a fixed source address
  ztmesh_tunnel:
    name: pistioin
    kind: vxlan
    vni: 1000
    remote: 192.168.125.1
    local: 192.168.125.2
    address: 192.168.126.2/30
    netns: ztproxy

- name: Remove a tunnel
  ztmesh_tunnel:
    name: istioin
    state: absent
"""

RETURN = r"""
link:
  description: The link after the run (in check mode, as it would be); empty when absent.
  returned: always
  type: dict
  contains:
    name:
      description: Link name.
      type: str
      returned: when present
      sample: istioin
    kind:
      description: C(geneve) or C(vxlan).
      type: str
      returned: when present
      sample: geneve
    vni:
      description: Virtual network identifier.
      type: int
      returned: when present
      sample: 1000
    remote:
      description: Address of the far end.
      type: str
      returned: when present
      sample: 192.168.125.2
    local:
      description: VXLAN local address; null when unset.
      type: str
      returned: when present
    port:
      description: UDP destination port.
      type: int
      returned: when present
      sample: 6081
    address:
      description: The IPv4 address with prefix length; null when the link has none or several.
      type: str
      returned: when present
      sample: 192.168.126.1/30
    addresses:
      description: All IPv4 addresses of the link.
      type: list
      elements: str
      returned: when present
      sample: [192.168.126.1/30]
    mtu:
      description: MTU; null in check mode before the link exists.
      type: int
      returned: when present
      sample: 1500
    link_state:
      description: C(up) or C(down).
      type: str
      returned: when present
      sample: up
    ifindex:
      description: Interface index; null in check mode before the link exists.
      type: int
      returned: when present
      sample: 7
recreated:
  description: Whether an existing link with different identity settings was (or would be) deleted and
    created again.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    NETNS_ARGUMENT_SPEC, enter_netns_or_fail, exit_with_result,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_links import (
    EOPNOTSUPP,
    NetlinkError,
    find_link,
    ifname_error,
    ipv4_addresses,
    is_up,
    link_info_data,
    link_kind,
    missing_kind_message,
    open_iproute,
    parse_ipv4,
    parse_ipv4_cidr,
    probe_link_create,
    require_pyroute2,
    set_exact_ipv4,
    set_mtu,
    set_state,
)

VNI_MAX = 2 ** 24 - 1
MTU_RANGE = (68, 65535)
DEFAULT_PORT = {"geneve": 6081, "vxlan": 4789}
TUNNEL_KINDS = ("geneve", "vxlan")
# Netlink attribute names per kind: identity settings the kernel cannot change on a live link.
ATTRS = {
    "geneve": {"vni": "IFLA_GENEVE_ID", "remote": "IFLA_GENEVE_REMOTE", "port": "IFLA_GENEVE_PORT"},
    "vxlan": {"vni": "IFLA_VXLAN_ID", "remote": "IFLA_VXLAN_GROUP", "port": "IFLA_VXLAN_PORT",
              "local": "IFLA_VXLAN_LOCAL"},
}
IDENTITY_FIELDS = ("kind", "vni", "remote", "port", "local")


def argument_spec() -> dict:
    spec = {
        "name": {"type": "str", "required": True},
        "kind": {"type": "str", "choices": list(TUNNEL_KINDS), "default": "geneve"},
        "vni": {"type": "int"},
        "remote": {"type": "str"},
        "local": {"type": "str"},
        "port": {"type": "int"},
        "address": {"type": "str"},
        "mtu": {"type": "int"},
        "link_state": {"type": "str", "choices": ["up", "down"], "default": "up"},
        "force": {"type": "bool", "default": True},
        "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    }
    spec.update(NETNS_ARGUMENT_SPEC)
    return spec


def desired_link(params: dict) -> dict:
    """Validate the parameters into the link they declare; raises ValueError with the fix."""
    error = ifname_error(params["name"], "name")
    if error:
        raise ValueError(error)
    if params["state"] == "absent":
        return {}
    kind = params["kind"]
    vni = params["vni"]
    if vni is None or params["remote"] is None:
        raise ValueError("vni and remote are required when state is present")
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"vni {vni} is out of range: a VNI is 24 bits, 0 to {VNI_MAX}")
    port = DEFAULT_PORT[kind] if params["port"] is None else params["port"]
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not a UDP port (1 to 65535)")
    if params["local"] is not None and kind != "vxlan":
        raise ValueError("local is only supported by kind: vxlan (Geneve picks its source address "
                         "from the route to remote); remove it")
    mtu = params["mtu"]
    if mtu is not None and not MTU_RANGE[0] <= mtu <= MTU_RANGE[1]:
        raise ValueError(f"mtu {mtu} is out of range ({MTU_RANGE[0]} to {MTU_RANGE[1]})")
    address = params["address"]
    return {
        "name": params["name"],
        "kind": kind,
        "vni": vni,
        "remote": str(parse_ipv4(params["remote"], "remote")),
        "local": None if params["local"] is None else str(parse_ipv4(params["local"], "local")),
        "port": port,
        "address": None if address is None else str(parse_ipv4_cidr(address, "address")),
        "mtu": mtu,
        "link_state": params["link_state"],
    }


def observe(ipr, name: str) -> dict:
    """The link as the kernel has it ({} when there is none)."""
    link = find_link(ipr, name)
    if link is None:
        return {}
    kind = link_kind(link)
    data = link_info_data(link)
    names = ATTRS.get(kind, {})
    addresses = ipv4_addresses(ipr, link["index"])
    return {
        "name": name,
        "kind": kind,
        "vni": data.get(names["vni"]) if names else None,
        "remote": data.get(names["remote"]) if names else None,
        "local": data.get(names["local"]) if "local" in names else None,
        "port": data.get(names["port"]) if names else None,
        "address": addresses[0] if len(addresses) == 1 else None,
        "addresses": addresses,
        "mtu": link.get_attr("IFLA_MTU"),
        "link_state": "up" if is_up(link) else "down",
        "ifindex": link["index"],
    }


def identity_differences(current: dict, want: dict) -> list:
    return [f"{field} {current.get(field)} (wanted {want[field]})"
            for field in IDENTITY_FIELDS if current.get(field) != want[field]]


def create_attrs(want: dict) -> dict:
    """pyroute2 keyword arguments that create the declared link (name and kind excluded)."""
    prefix = want["kind"]
    attrs = {f"{prefix}_id": want["vni"], f"{prefix}_port": want["port"],
             ("vxlan_group" if prefix == "vxlan" else "geneve_remote"): want["remote"]}
    if want["local"] is not None:
        attrs["vxlan_local"] = want["local"]
    if want["mtu"] is not None:
        attrs["mtu"] = want["mtu"]
    return attrs


def predicted(current: dict, want: dict, recreate: bool) -> dict:
    """The link check mode reports: what the run would leave behind."""
    base = {} if recreate or not current else current
    addresses = [want["address"]] if want["address"] else base.get("addresses", [])
    return {
        **{k: want[k] for k in ("name", "kind", "vni", "remote", "local", "port", "link_state")},
        "address": addresses[0] if len(addresses) == 1 else None,
        "addresses": addresses,
        "mtu": want["mtu"] if want["mtu"] is not None else base.get("mtu"),
        "ifindex": base.get("ifindex"),
    }


def needs_update(current: dict, want: dict) -> bool:
    return bool(
        (want["address"] and current["addresses"] != [want["address"]])
        or (want["mtu"] is not None and current["mtu"] != want["mtu"])
        or current["link_state"] != want["link_state"]
    )


def fail_unless_kind_supported(module, want: dict) -> None:
    probe = probe_link_create(want["kind"], create_attrs(want))
    if probe.ok:
        return
    if probe.errno == EOPNOTSUPP:
        other = [k for k in TUNNEL_KINDS if k != want["kind"]][0]
        module.fail_json(msg=missing_kind_message(want["kind"], other), probe_error=probe.message)
    module.fail_json(
        msg=f"the kernel rejected {want['kind']} link {want['name']} (vni {want['vni']}, remote "
            f"{want['remote']}, port {want['port']}, mtu {want['mtu']}): {probe.message}; nothing was "
            f"changed. Fix the values (the test link was created in a throwaway namespace)",
        probe_error=probe.message,
    )


def apply(ipr, current: dict, want: dict, recreate: bool) -> None:
    if recreate:
        ipr.link("del", index=current["ifindex"])
        current = {}
    if not current:
        ipr.link("add", ifname=want["name"], kind=want["kind"], **create_attrs(want))
    index = find_link(ipr, want["name"])["index"]
    if want["mtu"] is not None:
        set_mtu(ipr, index, want["mtu"])
    if want["address"]:
        set_exact_ipv4(ipr, index, [want["address"]])
    set_state(ipr, index, want["link_state"] == "up")


def run(module) -> dict:
    params = module.params
    try:
        want = desired_link(params)
    except ValueError as exc:
        module.fail_json(msg=f"{exc}; nothing was changed")
    ipr = open_iproute()
    try:
        current = observe(ipr, params["name"])
        if current and current["kind"] not in TUNNEL_KINDS:
            module.fail_json(
                msg=f"a link named {params['name']} exists and is a {current['kind'] or 'physical'} device, "
                    f"not a Geneve/VXLAN tunnel; ztmesh never deletes it. Choose another tunnel name or "
                    f"remove that link yourself; nothing was changed"
            )
        if params["state"] == "absent":
            if current and not module.check_mode:
                ipr.link("del", index=current["ifindex"])
            return {"changed": bool(current), "link": {}, "recreated": False,
                    "diff": {"before": current, "after": {}}}

        differences = identity_differences(current, want) if current else []
        recreate = bool(differences)
        if recreate and not params["force"]:
            module.fail_json(
                msg=f"link {want['name']} exists with different settings: {'; '.join(differences)}. "
                    f"The kernel cannot change these on a live link: set force: true to recreate it, or "
                    f"delete it ('ip link del {want['name']}'); nothing was changed"
            )
        if not current or recreate:
            fail_unless_kind_supported(module, want)
        changed = recreate or not current or needs_update(current, want)
        if module.check_mode or not changed:
            after = predicted(current, want, recreate) if changed else current
        else:
            apply(ipr, current, want, recreate)
            after = observe(ipr, want["name"])
        return {"changed": changed, "link": after, "recreated": recreate,
                "diff": {"before": current, "after": after}}
    except NetlinkError as exc:
        module.fail_json(msg=f"netlink request for link {params['name']} failed: {exc}")
    finally:
        ipr.close()


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    require_pyroute2(module)
    enter_netns_or_fail(module)
    result = run(module)
    exit_with_result(module, result)


if __name__ == "__main__":
    main()
