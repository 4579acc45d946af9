#!/usr/bin/python
"""Ansible module ztmesh_netns: a named network namespace and the veth pair that connects it."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ztmesh_netns
short_description: Manage a named network namespace and its veth link for the ztmesh proxy
description:
  - Creates a named network namespace (a bind mount at C(/run/netns/<name>), usable with
    C(ip netns exec)), brings its loopback up, and connects it with a veth pair. The host end lives in
    O(netns) (the task's namespace by default), the peer end inside the namespace O(name).
  - Addresses given for the veth ends are exact (other IPv4 addresses on those ends are removed), both
    ends are kept up, and drift (a deleted link or address, a link set down) is repaired.
  - Works through netlink (pyroute2), without running C(ip).
  - O(state=absent) deletes the host end of the veth (which deletes its peer) and the namespace.
version_added: "0.1.0"
author:
  - ztmesh contributors (@ztmesh)
requirements:
  - pyroute2 on the managed node
  - root (CAP_SYS_ADMIN to create and enter namespaces, CAP_NET_ADMIN for links)
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without changing the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
    details: Shows the namespace and the veth pair before and after.
  platform:
    description: Target operating systems the module works on.
    support: full
    platforms: linux
options:
  name:
    description: Namespace name; the namespace is C(/run/netns/<name>).
    type: str
    required: true
  state:
    description: C(present) creates or repairs; C(absent) deletes the namespace and the host end of the veth.
    type: str
    choices: [present, absent]
    default: present
  veth:
    description:
      - The veth pair between O(netns) and the namespace. Omit to manage only the namespace.
    type: dict
    suboptions:
      host_ifname:
        description: Name of the end in O(netns), at most 15 characters.
        type: str
        required: true
      peer_ifname:
        description: Name of the end inside the namespace O(name).
        type: str
        default: eth0
      host_address:
        description:
          - IPv4 address with prefix length of the host end, kept exact. Omit to leave its addresses alone.
        type: str
      peer_address:
        description:
          - IPv4 address with prefix length of the peer end, kept exact. Omit to leave its addresses alone.
        type: str
      mtu:
        description: MTU of both ends. Omit to keep the kernel's choice.
        type: int
  release_run_dir:
    description:
      - With O(state=absent), when no named namespace is left in C(/run/netns), also undo what the first
        C(ip netns add) on a host does, that is unmount the C(/run/netns) mount point and remove the
        directory.
      - Set it only when C(/run/netns) did not exist before ztmesh (the ztmesh_node role records that at
        first install, from the ztmesh_facts C(netns_run_dir) fact).
    type: bool
    default: false
  loopback_up:
    description: Bring C(lo) up inside the namespace.
    type: bool
    default: true
  netns:
    description:
      - Named network namespace where the host end of the veth lives; default is the task's namespace.
    type: str
notes:
  - Supports check mode and diff mode.
  - A namespace still used by processes (a running proxy) stays alive after O(state=absent) until they
    exit; the module warns and lists their process ids.
"""

EXAMPLES = r"""
- name: Proxy namespace with its veth link to the node
  ztmesh_netns:
    name: ztproxy
    veth:
      host_ifname: ztproxy0
      peer_ifname: eth0
      host_address: 192.168.125.1/30
      peer_address: 192.168.125.2/30

- name: Remove the proxy namespace and its veth
  ztmesh_netns:
    name: ztproxy
    veth:
      host_ifname: ztproxy0
    state: absent
"""

RETURN = r"""
actions:
  description: What the run did (in check mode, would do), in order; empty when nothing changed.
  returned: always
  type: list
  elements: str
  sample: [create namespace, set lo up, create veth pair, set host address 192.168.125.1/30]
namespace:
  description: Namespace name.
  returned: always
  type: str
  sample: ztproxy
veth:
  description: The veth pair after the run (in check mode, as it would be); empty when not managed or absent.
  returned: always
  type: dict
  contains:
    host_ifname:
      description: Name of the end in O(netns).
      type: str
      returned: when managed
      sample: ztproxy0
    peer_ifname:
      description: Name of the end inside the namespace.
      type: str
      returned: when managed
      sample: eth0
    host_address:
      description: IPv4 address of the host end (null when it has none or several).
      type: str
      returned: when managed
      sample: 192.168.125.1/30
    peer_address:
      description: IPv4 address of the peer end (null when it has none or several).
      type: str
      returned: when managed
      sample: 192.168.125.2/30
    mtu:
      description: MTU of the host end.
      type: int
      returned: when managed
      sample: 1500
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    NETNS_ARGUMENT_SPEC,
    NETNS_RUN_DIR,
    enter_netns_or_fail,
    entered_netns,
    netns_exists,
    netns_path,
    exit_with_result,
    is_mount_point,
)
from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_links import (
    NetlinkError,
    find_link,
    ifname_error,
    ipv4_addresses,
    is_up,
    link_kind,
    open_iproute,
    parse_ipv4_cidr,
    require_pyroute2,
    set_exact_ipv4,
    set_mtu,
    set_state,
)

try:
    from pyroute2 import netns as pyroute2_netns
except ImportError:  # require_pyroute2() reports it
    pyroute2_netns = None

NAME_MAX = 255


def argument_spec() -> dict:
    spec = {
        "name": {"type": "str", "required": True},
        "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        "veth": {
            "type": "dict",
            "options": {
                "host_ifname": {"type": "str", "required": True},
                "peer_ifname": {"type": "str", "default": "eth0"},
                "host_address": {"type": "str"},
                "peer_address": {"type": "str"},
                "mtu": {"type": "int"},
            },
        },
        "loopback_up": {"type": "bool", "default": True},
        "release_run_dir": {"type": "bool", "default": False},
    }
    spec.update(NETNS_ARGUMENT_SPEC)
    return spec


def validate(params: dict) -> dict:
    """Checked and normalised parameters; raises ValueError with what to fix."""
    name = params["name"]
    if not name or "/" in name or name in (".", "..") or len(name) > NAME_MAX or \
            any(c.isspace() for c in name):
        raise ValueError(f"name {name!r} is not a valid namespace name (a file name under "
                         f"{NETNS_RUN_DIR}: no '/', no spaces, not '.' or '..')")
    if params["netns"] == name:
        raise ValueError(f"netns and name are both {name!r}: the host end of the veth must live outside "
                         f"the namespace it connects; leave netns unset to use the task's namespace")
    veth = params["veth"]
    if veth is None:
        return {"name": name, "veth": None}
    for key in ("host_ifname", "peer_ifname"):
        error = ifname_error(veth[key], f"veth.{key}")
        if error:
            raise ValueError(error)
    if veth["peer_ifname"] == "lo":
        raise ValueError("veth.peer_ifname cannot be 'lo' (the namespace's loopback)")
    want = dict(veth)
    for key in ("host_address", "peer_address"):
        if veth[key] is not None:
            want[key] = str(parse_ipv4_cidr(veth[key], f"veth.{key}"))
    if veth["mtu"] is not None and not 68 <= veth["mtu"] <= 65535:
        raise ValueError(f"veth.mtu {veth['mtu']} is out of range (68 to 65535)")
    return {"name": name, "veth": want}


def _single(addresses: list):
    return addresses[0] if len(addresses) == 1 else None


def observe(host_ipr, ns_ipr, want: dict) -> dict:
    """State of everything the module owns. ``ns_ipr`` is None when the namespace does not exist."""
    state = {"namespace": want["name"], "exists": ns_ipr is not None, "loopback_up": False, "veth": {}}
    if ns_ipr is not None:
        lo = find_link(ns_ipr, "lo")
        state["loopback_up"] = bool(lo is not None and is_up(lo))
    spec = want["veth"]
    if spec is None:
        return state
    host = find_link(host_ipr, spec["host_ifname"])
    peer = find_link(ns_ipr, spec["peer_ifname"]) if ns_ipr is not None else None
    veth = {"host_ifname": spec["host_ifname"], "peer_ifname": spec["peer_ifname"],
            "host_kind": None if host is None else link_kind(host) or "physical",
            "paired": _paired(host, peer)}
    if host is not None:
        veth.update(host_ifindex=host["index"], host_up=is_up(host), mtu=host.get_attr("IFLA_MTU"),
                    host_addresses=ipv4_addresses(host_ipr, host["index"]))
    if peer is not None:
        veth.update(peer_ifindex=peer["index"], peer_kind=link_kind(peer) or "physical", peer_up=is_up(peer),
                    peer_mtu=peer.get_attr("IFLA_MTU"), peer_addresses=ipv4_addresses(ns_ipr, peer["index"]))
    state["veth"] = veth
    return state


def _paired(host, peer) -> bool:
    """Both ends exist, are veths, and point at each other (IFLA_LINK holds the peer's ifindex)."""
    if host is None or peer is None or link_kind(host) != "veth" or link_kind(peer) != "veth":
        return False
    return host.get_attr("IFLA_LINK") == peer["index"] and peer.get_attr("IFLA_LINK") == host["index"]


def public_veth(veth: dict) -> dict:
    """The ``veth`` return value from an observed (or predicted) state."""
    if not veth:
        return {}
    return {"host_ifname": veth["host_ifname"], "peer_ifname": veth["peer_ifname"],
            "host_address": _single(veth.get("host_addresses", [])),
            "peer_address": _single(veth.get("peer_addresses", [])), "mtu": veth.get("mtu")}


def veth_actions(current: dict, spec: dict) -> list:
    """What a present run must do to the veth, in order; [] when it is already right."""
    if current["host_kind"] not in (None, "veth"):
        return []  # refused by the caller
    actions = []
    if not current["paired"]:
        if current["host_kind"] == "veth":
            actions.append("delete host end (not paired with the namespace's peer)")
        if current.get("peer_kind"):
            actions.append(f"delete stale {spec['peer_ifname']} in the namespace")
        actions.append("create veth pair")
        fresh = True
    else:
        fresh = False
    if spec["mtu"] is not None and (fresh or current["mtu"] != spec["mtu"] or
                                    current.get("peer_mtu") != spec["mtu"]):
        actions.append(f"set mtu {spec['mtu']}")
    for end in ("host", "peer"):
        desired = spec[f"{end}_address"]
        if desired is not None and (fresh or current.get(f"{end}_addresses") != [desired]):
            actions.append(f"set {end} address {desired}")
        if fresh or not current.get(f"{end}_up"):
            actions.append(f"set {end} end up")
    return actions


def predicted(current: dict, want: dict, loopback_up: bool) -> dict:
    after = {"namespace": want["name"], "exists": True,
             "loopback_up": current["loopback_up"] or loopback_up, "veth": {}}
    spec = want["veth"]
    if spec is not None:
        veth = current["veth"] if current["veth"].get("paired") else {}
        after["veth"] = {
            "host_ifname": spec["host_ifname"], "peer_ifname": spec["peer_ifname"], "host_kind": "veth",
            "paired": True, "host_up": True, "peer_up": True,
            "mtu": spec["mtu"] if spec["mtu"] is not None else veth.get("mtu"),
            "host_addresses": [spec["host_address"]] if spec["host_address"] else
            veth.get("host_addresses", []),
            "peer_addresses": [spec["peer_address"]] if spec["peer_address"] else
            veth.get("peer_addresses", []),
        }
    return after


def namespace_pids(name: str) -> list:
    """Processes whose network namespace is ``name`` (they keep it alive after its unmount)."""
    try:
        target = os.stat(netns_path(name))
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return sorted(pids)


class Namespaces:
    """Netlink sockets for the task's namespace and for the managed one (opened when it exists)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.host = open_iproute()
        self.inner = None
        self.reopen()

    def reopen(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        if netns_exists(self.name):
            with entered_netns(self.name):
                self.inner = open_iproute()

    def close(self) -> None:
        self.host.close()
        if self.inner is not None:
            self.inner.close()


def run_dir_releasable(name: str) -> bool:
    """Is /run/netns there, holding nothing but (at most) the namespace being removed?"""
    if not os.path.isdir(NETNS_RUN_DIR):
        return False
    return all(entry == name for entry in os.listdir(NETNS_RUN_DIR))


def release_run_dir(module) -> None:
    """Unmount /run/netns (iproute2 may have bind-mounted it onto itself) and remove it."""
    umount = module.get_bin_path("umount", required=True)
    # A bind mount onto itself can be stacked (iproute2 and pyroute2 each mount when it is not yet a
    # mount point); a bounded loop takes off every layer.
    for _layer in range(8):
        if not is_mount_point(NETNS_RUN_DIR):
            break
        rc, _out, err = module.run_command([umount, NETNS_RUN_DIR])
        if rc != 0:
            module.fail_json(msg=f"the namespace was removed, but unmounting {NETNS_RUN_DIR} failed: "
                                 f"{err.strip()}; something still uses it: find it with "
                                 f"'findmnt -R {NETNS_RUN_DIR}', then rerun")
    if os.listdir(NETNS_RUN_DIR):
        return  # a namespace appeared meanwhile: the directory is in use again
    os.rmdir(NETNS_RUN_DIR)


def create_namespace(name: str) -> None:
    path = netns_path(name)
    if os.path.lexists(path) and not netns_exists(name):
        os.unlink(path)  # stale mount point left by an interrupted creation: not a namespace
    pyroute2_netns.create(name)


def apply_present(socks: Namespaces, want: dict, loopback_up: bool) -> None:
    if socks.inner is None:
        create_namespace(want["name"])
        socks.reopen()
    if loopback_up:
        set_state(socks.inner, find_link(socks.inner, "lo")["index"], True)
    spec = want["veth"]
    if spec is None:
        return
    current = observe(socks.host, socks.inner, want)["veth"]
    if not current["paired"]:
        if current["host_kind"] == "veth":
            socks.host.link("del", index=current["host_ifindex"])
        stale = find_link(socks.inner, spec["peer_ifname"])
        if stale is not None:
            socks.inner.link("del", index=stale["index"])
        fd = os.open(netns_path(want["name"]), os.O_RDONLY)
        try:
            socks.host.link("add", ifname=spec["host_ifname"], kind="veth",
                            peer={"ifname": spec["peer_ifname"], "net_ns_fd": fd})
        finally:
            os.close(fd)
    for ipr, ifname, address in ((socks.host, spec["host_ifname"], spec["host_address"]),
                                 (socks.inner, spec["peer_ifname"], spec["peer_address"])):
        index = find_link(ipr, ifname)["index"]
        if spec["mtu"] is not None:
            set_mtu(ipr, index, spec["mtu"])
        if address is not None:
            set_exact_ipv4(ipr, index, [address])
        set_state(ipr, index, True)


def run(module) -> dict:
    params = module.params
    try:
        want = validate(params)
    except ValueError as exc:
        module.fail_json(msg=f"{exc}; nothing was changed")
    socks = Namespaces(want["name"])
    try:
        before = observe(socks.host, socks.inner, want)
        if params["state"] == "absent":
            return absent(module, socks, want, before)
        veth = before["veth"]
        if veth and veth["host_kind"] not in (None, "veth"):
            module.fail_json(
                msg=f"{veth['host_ifname']} exists and is a {veth['host_kind']} device, not a veth; ztmesh "
                    f"never deletes it. Choose another veth.host_ifname; nothing was changed"
            )
        actions = [] if before["exists"] else ["create namespace"]
        if params["loopback_up"] and not before["loopback_up"]:
            actions.append("set lo up")
        if want["veth"] is not None:
            actions += veth_actions(veth, want["veth"])
        if actions and not module.check_mode:
            apply_present(socks, want, params["loopback_up"])
            after = observe(socks.host, socks.inner, want)
        else:
            after = predicted(before, want, params["loopback_up"]) if actions else before
        return {"changed": bool(actions), "actions": actions, "namespace": want["name"],
                "veth": public_veth(after["veth"]), "diff": {"before": before, "after": after}}
    except NetlinkError as exc:
        module.fail_json(msg=f"netlink request for namespace {want['name']} failed: {exc}")
    finally:
        socks.close()


def absent(module, socks: Namespaces, want: dict, before: dict) -> dict:
    actions = []
    veth = before["veth"]
    if veth and veth["host_kind"] == "veth":
        actions.append(f"delete veth {veth['host_ifname']}")
    elif veth and veth["host_kind"] is not None:
        module.warn(f"{veth['host_ifname']} is a {veth['host_kind']} device, not a veth: left in place")
    if before["exists"] or os.path.lexists(netns_path(want["name"])):
        actions.append("delete namespace")
    release = module.params["release_run_dir"] and run_dir_releasable(want["name"])
    if release:
        actions.append(f"release {NETNS_RUN_DIR}")
    pids = namespace_pids(want["name"]) if before["exists"] else []
    if pids:
        module.warn(f"processes {pids} still run in namespace {want['name']}: it stays alive, without its "
                    f"name, until they exit. Stop them (the ztproxy service) before removing the namespace")
    if actions and not module.check_mode:
        if veth and veth["host_kind"] == "veth":
            socks.host.link("del", index=veth["host_ifindex"])
        if socks.inner is not None:
            socks.inner.close()
            socks.inner = None
        if before["exists"]:
            pyroute2_netns.remove(want["name"])
        elif os.path.lexists(netns_path(want["name"])):
            os.unlink(netns_path(want["name"]))
        if release:
            release_run_dir(module)
    after = {"namespace": want["name"], "exists": False, "loopback_up": False, "veth": {}}
    return {"changed": bool(actions), "actions": actions, "namespace": want["name"], "veth": {},
            "diff": {"before": before, "after": after}}


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    require_pyroute2(module)
    enter_netns_or_fail(module)
    result = run(module)
    exit_with_result(module, result)


if __name__ == "__main__":
    main()
