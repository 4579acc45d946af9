"""Shared helpers of the ztmesh Ansible modules.

Every ztmesh module takes a ``netns`` parameter. Rather than threading the namespace through every
netlink socket and every command, a module enters the namespace once, at start, with ``setns(2)``:
from then on netlink sockets, ``/proc/sys/net``, and every command it runs (iptables-restore, ipset)
see that namespace, and nothing else can be touched by mistake.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

NETNS_RUN_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000

# Merged into the argument_spec of every ztmesh module.
NETNS_ARGUMENT_SPEC = {"netns": {"type": "str", "required": False, "default": None}}


class NetnsError(Exception):
    """The requested network namespace cannot be entered."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(name: str | None) -> None:
    """Move this process into the named network namespace (``ip netns`` naming); None stays put."""
    if not name:
        return
    if "/" in name or name in (".", ".."):
        raise NetnsError(f"netns {name!r} is not a valid namespace name (a name under {NETNS_RUN_DIR})")
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise NetnsError(
            f"network namespace {name!r} does not exist ({path} is missing); create it first "
            f"(ztmesh_netns, or 'ip netns add {name}') or fix the netns parameter"
        )
    fd = os.open(path, os.O_RDONLY)
    try:
        _setns(fd)
    except OSError as exc:
        raise NetnsError(f"cannot enter network namespace {name!r}: {exc}; modules need root") from exc
    finally:
        os.close(fd)


def enter_netns_or_fail(module) -> None:
    """Enter ``module.params['netns']``, or fail the module with an operator-grade message."""
    try:
        enter_netns(module.params.get("netns"))
    except NetnsError as exc:
        module.fail_json(msg=str(exc))
