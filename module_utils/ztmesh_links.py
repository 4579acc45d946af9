"""Netlink (pyroute2) helpers shared by the ztmesh link modules: find a link, read its kind and
tunnel attributes, keep its IPv4 addresses exactly as declared, set it up or down, validate names and
addresses, and probe whether the kernel can create a link kind at all.

Everything here works on an ``IPRoute`` socket handed in by the caller, so the caller decides which
network namespace is touched (the socket is bound to the namespace it was opened in).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Dict, List, Optional, Tuple

from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_common import (
    ProbeResult,
    probe_in_throwaway_netns,
)

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    PYROUTE2_IMPORT_ERROR: Optional[str] = None
except ImportError as _exc:  # reported by require_pyroute2(), so the module fails with advice
    IPRoute = None  # type: ignore[assignment,misc]
    NetlinkError = OSError  # type: ignore[assignment,misc]
    PYROUTE2_IMPORT_ERROR = str(_exc)

IFNAMSIZ = 16  # kernel limit, including the terminating NUL: names are at most 15 characters
IFF_UP = 0x1
ENODEV = 19
EOPNOTSUPP = 95

# Kernel configuration option behind each link kind, for the message when a kind is missing.
KIND_CONFIG = {"geneve": "CONFIG_GENEVE", "vxlan": "CONFIG_VXLAN", "veth": "CONFIG_VETH"}


def require_pyroute2(module) -> None:
    if PYROUTE2_IMPORT_ERROR is not None:
        module.fail_json(
            msg=f"the pyroute2 Python library is required on the node ({PYROUTE2_IMPORT_ERROR}); install it "
                f"for the interpreter Ansible uses (python3-pyroute2 or 'pip install pyroute2')"
        )


# ---------------------------------------------------------------- validation (no kernel access)

def ifname_error(name: object, what: str = "interface name") -> Optional[str]:
    """None when ``name`` is a valid Linux interface name, else an operator-grade message."""
    if not isinstance(name, str) or not name:
        return f"{what} must be a non-empty string"
    if len(name) >= IFNAMSIZ:
        return f"{what} {name!r} is {len(name)} characters long; Linux allows at most {IFNAMSIZ - 1}"
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        return f"{what} {name!r} is invalid: it must not be '.' or '..' nor contain '/', ':' or spaces"
    return None


def parse_ipv4(value: object, what: str) -> ipaddress.IPv4Address:
    """An IPv4 unicast host address; raises ValueError with a message that names ``what``."""
    try:
        addr = ipaddress.IPv4Address(str(value))
    except ValueError:
        raise ValueError(f"{what} must be an IPv4 address such as 192.0.2.10, not {value!r}") from None
    if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{what} must be a unicast IPv4 address, not {value}")
    return addr


def parse_ipv4_cidr(value: object, what: str) -> ipaddress.IPv4Interface:
    """An IPv4 address with its prefix length (``192.168.126.1/30``); ValueError otherwise."""
    text = str(value)
    if "/" not in text:
        raise ValueError(f"{what} must be an IPv4 address with a prefix length such as "
                         f"192.168.126.1/30, not {value!r}")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise ValueError(f"{what} must be an IPv4 address with a prefix length such as "
                         f"192.168.126.1/30, not {value!r}") from None
    parse_ipv4(iface.ip, what)
    if iface.network.prefixlen < 31 and iface.ip in (iface.network.network_address,
                                                       iface.network.broadcast_address):
        raise ValueError(f"{what} {text} is the network or broadcast address of {iface.network}; "
                         f"use a host address of that network")
    return iface


# ---------------------------------------------------------------- reading links

def find_link(ipr, ifname: str):
    """The link message of ``ifname`` in the socket's namespace, or None."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as exc:
        if exc.code == ENODEV:
            return None
        raise


def nested_attr(msg, *path: str):
    """The netlink attribute at ``path`` (None when any level is missing).

    Only ``get_attr`` is used: it behaves the same in every pyroute2 the nodes have (0.6 on Ubuntu
    22.04, 0.7 on Debian 12 and RHEL 9, 0.9 from PyPI), whereas ``msg.get("IFLA_...")`` and tuple
    paths look attributes up only in pyroute2 0.8 and newer and silently return None before.
    """
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def link_kind(link) -> Optional[str]:
    """``veth``, ``vxlan``, ``geneve``...; None for a physical device or the loopback."""
    return nested_attr(link, "IFLA_LINKINFO", "IFLA_INFO_KIND")


def link_info_data(link) -> Dict[str, object]:
    """IFLA_INFO_DATA attributes (the kind-specific settings) as a plain dict."""
    data = nested_attr(link, "IFLA_LINKINFO", "IFLA_INFO_DATA")
    if not data:
        return {}
    return {name: value for name, value in data.get("attrs", []) if name != "UNKNOWN"}


def is_up(link) -> bool:
    """Administratively up (the IFF_UP flag; carrier is a separate matter)."""
    return bool(link["flags"] & IFF_UP)


def ipv4_addresses(ipr, index: int) -> List[str]:
    """IPv4 addresses of a link as sorted ``a.b.c.d/len`` strings."""
    return sorted(
        f"{msg.get_attr('IFA_ADDRESS') if msg.get_attr('IFA_LOCAL') is None else msg.get_attr('IFA_LOCAL')}"
        f"/{msg['prefixlen']}"
        for msg in ipr.get_addr(index=index, family=socket.AF_INET)
    )


# ---------------------------------------------------------------- changing links

def exact_address_plan(current: List[str], desired: List[str]) -> Tuple[List[str], List[str]]:
    """(to_add, to_remove) that turn ``current`` into exactly ``desired`` (``a.b.c.d/len`` strings)."""
    want = [str(ipaddress.IPv4Interface(a)) for a in desired]
    have = [str(ipaddress.IPv4Interface(a)) for a in current]
    return [a for a in want if a not in have], [a for a in have if a not in want]


def set_exact_ipv4(ipr, index: int, desired: List[str]) -> bool:
    """Make the link's IPv4 addresses exactly ``desired``; IPv6 (link-local...) is left alone.

    Extra addresses go first and the plan is recomputed afterwards: deleting a primary address also
    deletes its secondaries, which may include one we want.
    """
    _, to_remove = exact_address_plan(ipv4_addresses(ipr, index), desired)
    for cidr in to_remove:
        iface = ipaddress.IPv4Interface(cidr)
        try:
            ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != 99:  # EADDRNOTAVAIL: already gone with its primary
                raise
    to_add, _ = exact_address_plan(ipv4_addresses(ipr, index), desired)
    for cidr in to_add:
        iface = ipaddress.IPv4Interface(cidr)
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    return bool(to_remove or to_add)


def set_state(ipr, index: int, up: bool) -> None:
    ipr.link("set", index=index, state="up" if up else "down")


def set_mtu(ipr, index: int, mtu: int) -> None:
    ipr.link("set", index=index, mtu=mtu)


def open_iproute():
    """A netlink socket bound to the current network namespace (caller closes it)."""
    return IPRoute()


# ---------------------------------------------------------------- kernel capability probe

def probe_link_create(kind: str, attrs: Dict[str, object]) -> ProbeResult:
    """Create ``kind`` with ``attrs`` in a throwaway namespace: does the kernel accept it?

    Running the real request (kind, VNI, remote, port, MTU...) rather than only the kind also
    catches values the kernel rejects, before anything on the node has been touched.
    """

    def create() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname="ztmesh-probe", kind=kind, **attrs)

    return probe_in_throwaway_netns(create)


def missing_kind_message(kind: str, other: Optional[str] = None) -> str:
    config = KIND_CONFIG.get(kind, f"the kernel option for {kind}")
    msg = (f"this kernel cannot create {kind} links (Operation not supported: it was built without "
           f"{config} or the {kind} module cannot be loaded); nothing was changed.")
    if other:
        msg += (f" Use the {other} tunnel kind instead: set the role variable "
                f"'ztmesh_tunnel_kind: {other}' (module option kind: {other}), "
                f"or boot a kernel with {config}.")
    return msg
