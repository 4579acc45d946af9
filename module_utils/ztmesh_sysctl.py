"""Kernel parameters (``/proc/sys``) for the ztmesh modules: key validation, reading, writing with
roll-back, and the ``/etc/sysctl.d`` file ztmesh owns.

``/proc/sys/net`` belongs to the network namespace of the process that opens a file in it, so once a
module has entered its ``netns`` (setns) every read and write here hits that namespace's values.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, List, Optional, Tuple

PROC_SYS = "/proc/sys"
PERSIST_DIR = "/etc/sysctl.d/"
PERSIST_SUFFIX = ".conf"
PERSIST_HEADER = ("# Managed by Ansible (ztmesh_sysctl). This file holds exactly the ztmesh sysctls;\n"
                  "# local edits are overwritten on the next run.\n")
# One path component of a key: interface names may hold '-', '_', '@', '+'... but never '/' or '.'.
_SEGMENT = re.compile(r"^[A-Za-z0-9_@+\-]+$")


class SysctlError(Exception):
    """A key or value the module must refuse; the message says what to do."""


def key_error(key: object) -> Optional[str]:
    """None for a well-formed dotted key, else why it is not one."""
    if not isinstance(key, str) or not key:
        return f"sysctl key {key!r} must be a non-empty string"
    if "/" in key:
        return (f"sysctl key {key!r} contains '/': write keys dotted (net.ipv4.ip_forward); interface "
                f"names that contain a dot cannot be addressed")
    segments = key.split(".")
    if len(segments) < 2 or not all(_SEGMENT.match(s) for s in segments):
        return (f"sysctl key {key!r} is malformed: dotted names of letters, digits, '_', '-', '@', '+' "
                f"without empty parts (no '..'), such as net.ipv4.conf.istioin.rp_filter")
    return None


def key_path(key: str) -> str:
    return os.path.join(PROC_SYS, *key.split("."))


def normalize(value: object) -> str:
    """The comparable form of a value: booleans as 1/0, whitespace runs collapsed to one space.

    ``/proc/sys`` separates multi-value entries with tabs (``ip_local_port_range``), users write spaces.
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    return " ".join(str(value).split())


def value_error(key: str, value: object) -> Optional[str]:
    if value is None or isinstance(value, (dict, list)):
        return f"value of sysctl {key} must be a string or a number, not {value!r}"
    text = str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        return f"value of sysctl {key} must be a single line"
    if not normalize(value):
        return f"value of sysctl {key} is empty"
    return None


def read(key: str) -> Optional[str]:
    """Normalised current value, or None when the key does not exist (e.g. its interface is gone)."""
    path = key_path(key)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return normalize(handle.read())


def writable(key: str) -> bool:
    return os.access(key_path(key), os.W_OK)


def write(key: str, value: str) -> None:
    with open(key_path(key), "w", encoding="utf-8") as handle:
        handle.write(value)


def apply(changes: List[Tuple[str, str]], previous: Dict[str, Optional[str]]) -> None:
    """Write ``changes`` in order; if the kernel refuses one, restore those already written and raise.

    A task that fails therefore leaves every value as it found it.
    """
    done: List[str] = []
    for key, value in changes:
        try:
            write(key, value)
        except OSError as exc:
            for written in reversed(done):
                # best effort; the original error is what the operator must see
                with contextlib.suppress(OSError):
                    write(written, previous[written] or "")
            raise SysctlError(
                f"the kernel refused {key} = {value!r} ({exc.strerror}); values already written were "
                f"restored. Check the value (see the kernel's sysctl documentation for {key})"
            ) from exc
        done.append(key)
    # Reading back catches values the kernel accepted but stored differently (clamped, reformatted).
    for key, value in changes:
        actual = read(key)
        if actual != value:
            raise SysctlError(f"{key} reads back as {actual!r} after writing {value!r}: the kernel "
                              f"adjusted it; use the value it accepts")


def persist_path_error(path: str) -> Optional[str]:
    normalized = os.path.normpath(path)
    if (not os.path.isabs(path) or normalized != path or not path.startswith(PERSIST_DIR)
            or os.path.dirname(path) != PERSIST_DIR.rstrip("/") or not path.endswith(PERSIST_SUFFIX)
            or path == PERSIST_DIR + PERSIST_SUFFIX):
        return (f"persist must be a file directly in {PERSIST_DIR} whose name ends in {PERSIST_SUFFIX} "
                f"(such as {PERSIST_DIR}90-ztmesh.conf), not {path!r}: systemd-sysctl and "
                f"'sysctl --system' read only those")
    return None


def render_persist(values: Dict[str, str], ignore_missing: bool) -> str:
    """File content holding exactly ``values``, in the given order.

    With ``ignore_missing`` the lines carry sysctl.d's ``-`` prefix, so a key whose interface does not
    exist yet at boot is skipped quietly instead of failing systemd-sysctl.
    """
    prefix = "-" if ignore_missing else ""
    return PERSIST_HEADER + "".join(f"{prefix}{key} = {value}\n" for key, value in values.items())


def read_file(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
