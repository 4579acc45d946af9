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
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

NETNS_RUN_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000

# Merged into the argument_spec of every ztmesh module.
NETNS_ARGUMENT_SPEC = {"netns": {"type": "str", "required": False, "default": None}}


def _mount_id(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    raise ValueError("no mnt_id in fdinfo")


def is_mount_point(path: str) -> bool:
    """Is ``path`` the root of a mount? os.path.ismount misses a directory bind-mounted onto itself
    (what ``ip netns add`` does to /run/netns: same device), and /proc/self/mountinfo also lists mounts
    hidden under a later one; the mount id of the path against its parent's is exact."""
    real = os.path.realpath(path)
    try:
        return _mount_id(real) != _mount_id(os.path.dirname(real))
    except (OSError, ValueError):
        return os.path.ismount(path)


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


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def _nsfs_device() -> int:
    # Every namespace file (/proc/*/ns/*, and a /run/netns bind mount of one) lives on the nsfs device.
    return os.stat("/proc/self/ns/net").st_dev


def netns_exists(name: str) -> bool:
    """True when ``/run/netns/<name>`` is a live namespace (a bind mount of nsfs), not a stale file."""
    try:
        return os.stat(netns_path(name)).st_dev == _nsfs_device()
    except OSError:
        return False


@contextmanager
def entered_netns(name: str | None) -> Iterator[None]:
    """Run the body inside the named namespace, then return to the current one.

    Sockets opened inside (netlink, /proc/sys/net files) stay bound to that namespace after the
    return, which is how a module talks to two namespaces (a veth's two ends) without helper processes.
    """
    if not name:
        yield
        return
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        enter_netns(name)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of a probe run in a throwaway namespace: ``ok``, else an errno and a message."""

    ok: bool
    errno: int = 0
    message: str = ""


_PROBE_TIMEOUT = 20.0


def probe_in_throwaway_netns(probe: Callable[[], None], timeout: float = _PROBE_TIMEOUT) -> ProbeResult:
    """Run ``probe()`` in a forked child inside a brand-new, unnamed network namespace.

    The namespace exists only as long as the child does, so whatever the probe creates (a tunnel
    link, an iptables rule, an ipset) disappears with it: the host is never changed. The probe
    signals failure by raising; an ``OSError``-like exception's errno is reported back.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's code
        code = 0
        try:
            os.close(read_end)
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.unshare(_CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
            probe()
        except BaseException as exc:  # report everything, the parent decides
            code = getattr(exc, "code", None) or getattr(exc, "errno", None) or 1
            if not isinstance(code, int) or not 0 < code < 256:
                code = 1
            os.write(write_end, str(exc).encode("utf-8", "replace")[:4000])
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ProbeResult(False, 0, f"probe did not finish within {timeout:.0f} s")
            time.sleep(0.01)
        message = os.read(read_end, 4096).decode("utf-8", "replace")
    finally:
        os.close(read_end)
    code = os.waitstatus_to_exitcode(status)  # negative when killed by a signal
    return ProbeResult(code == 0, code if code > 0 else 0, message)


def exit_with_result(module, result: dict) -> None:
    """Exit with ``result``; its ``diff`` (before/after of what the module owns) only in diff mode."""
    diff = result.pop("diff", None)
    if module._diff and diff is not None:
        result["diff"] = diff
    module.exit_json(**result)
