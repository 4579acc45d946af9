"""Test tiers: the folder a test lives in is its tier (unit, fuzz, netns, molecule, vm).

A tier this machine cannot run is skipped with the reason, which ``-ra`` prints in the summary: never
silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The checkout's ansible_collections/ztmesh/mesh (a view of modules/, module_utils/, ...): tests import
# the modules' utilities by the name the modules use, ansible_collections.ztmesh.mesh.plugins.module_utils.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TIERS = ("unit", "fuzz", "netns", "molecule", "vm")


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "netns tier needs root (run the README's test command as root)"
    for tool in ("ip", "iptables", "ipset"):
        if not shutil.which(tool):
            return f"netns tier needs '{tool}' (scripts/setup.sh installs it)"
    probe = subprocess.run(["ip", "netns", "add", "ztmesh-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "ztmesh-probe"], capture_output=True)
    return None


def _molecule_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "molecule tier needs root (podman with privileged containers)"
    if not shutil.which("podman"):
        return "molecule tier needs podman (scripts/setup.sh installs it)"
    if not os.environ.get("CONTAINERS_CONF"):
        return "molecule tier needs CONTAINERS_CONF (run it through scripts/test.sh)"
    return None


def _vm_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "vm tier needs root"
    if not shutil.which("qemu-system-x86_64"):
        return "vm tier needs qemu-system-x86_64 (scripts/setup.sh installs it)"
    return None


_CHECKS = {"netns": _netns_unavailable, "molecule": _molecule_unavailable, "vm": _vm_unavailable}
_reasons: dict[str, str | None] = {}


def tier_of(path: Path) -> str | None:
    try:
        rel = path.resolve().relative_to(REPO / "tests")
    except ValueError:
        return None
    return rel.parts[0] if rel.parts and rel.parts[0] in TIERS else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(Path(str(item.fspath)))
        if tier is None:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        check = _CHECKS.get(tier)
        if check is None:
            continue
        if tier not in _reasons:
            _reasons[tier] = check()
        if _reasons[tier]:
            item.add_marker(pytest.mark.skip(reason=_reasons[tier]))
