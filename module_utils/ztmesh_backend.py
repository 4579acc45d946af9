"""Which iptables backend (legacy or nf_tables) a host uses, detected the way kube-proxy and Calico do.

A host can have both backends loaded at once: rules written through ``iptables-legacy`` and rules
written through ``iptables-nft`` live in different kernel tables, both are evaluated, and neither tool
shows the other's rules. Writing ztmesh's chains into the backend the rest of the host does NOT use is
the classic "iptables-legacy/nft mix-up": the rules are there, but they run in an order nobody can see.
So the backend is chosen from what the host *already uses*, in this order:

1. a backend that already holds ztmesh chains (``ztunnel-*``) keeps them: never move or mix;
2. a backend that holds the Kubernetes hint chain ``KUBE-IPTABLES-HINT`` (kubelet's statement of the
   node's backend; honoured like the kubernetes-sigs iptables-wrappers do);
3. the backend with more rules (``-A`` lines in ``*-save``), as kube-proxy's iptables-wrapper and
   Calico's ``auto`` mode decide;
4. neither has any rule: the mode of the distribution's default ``iptables`` command
   (``iptables --version`` says ``(legacy)`` or ``(nf_tables)``; before iptables 1.8 there is only legacy).

``detect_iptables_backend()`` is the entry point; ``backend_commands()`` resolves the commands of a
backend chosen by the operator. Both only read: they run ``--version`` and ``*-save``, never a write.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional, Tuple

BACKENDS = ("legacy", "nft")
# Chains whose presence pins the backend (see the module docstring, steps 1 and 2).
OWNED_CHAIN_PREFIX = "ztunnel-"
KUBE_HINT_CHAIN = "KUBE-IPTABLES-HINT"
# Ansible runs modules with a PATH that may lack the sbin directories, where the tools live.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_SAVE_TIMEOUT = 30
_VERSION_RE = re.compile(r"v(\d+(?:\.\d+)*)(?:\s+\((legacy|nf_tables)\))?")

# (argv) -> (rc, stdout); replaceable so unit tests can feed recorded tool output.
Runner = Callable[[List[str]], Tuple[int, str]]


@dataclass(frozen=True)
class IptablesBackend:
    """The chosen backend and the commands that operate on it.

    backend:  ``"legacy"``, ``"nft"``, or ``"none"`` (no iptables tool installed: every command is None).
    version:  iptables version string such as ``"1.8.9"`` (None when unknown).
    iptables: absolute path of ``iptables``/``ip6tables`` for that backend.
    save:     absolute path of the matching ``*-save`` command.
    restore:  absolute path of the matching ``*-restore`` command (use it with ``--noflush``).
    ip_version: 4 or 6.
    reason:   one sentence saying why this backend was chosen (for messages and facts).
    rule_counts: ``{"legacy": n, "nft": n}``, rules found in each backend (-1: tool missing or failed).
    tables:   ``{"legacy": [...], "nft": [...]}``, tables each backend's ``*-save`` lists (the tables
              that exist now: the ztmesh_node role records them so uninstall can delete only the
              tables ztmesh created).
    """

    backend: str
    version: Optional[str]
    iptables: Optional[str]
    save: Optional[str]
    restore: Optional[str]
    ip_version: int = 4
    reason: str = ""
    rule_counts: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "version": self.version,
            "iptables": self.iptables,
            "save": self.save,
            "restore": self.restore,
            "ip_version": self.ip_version,
            "reason": self.reason,
            "rule_counts": dict(self.rule_counts),
            "tables": {backend: list(names) for backend, names in self.tables.items()},
        }


def which(name: str) -> Optional[str]:
    """Absolute path of a command, looking in PATH and then in the sbin directories."""
    path = os.environ.get("PATH", "")
    extra = [d for d in _SBIN_DIRS if d not in path.split(os.pathsep)]
    return shutil.which(name, path=os.pathsep.join([path, *extra]) if path else os.pathsep.join(extra))


def _run(argv: List[str]) -> Tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_SAVE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 127, ""
    # iptables prints the version on stdout; old releases printed warnings on stderr: keep both.
    return proc.returncode, proc.stdout + proc.stderr


def parse_version(text: str) -> Tuple[Optional[str], Optional[str]]:
    """``"iptables v1.8.9 (nf_tables)"`` -> ``("1.8.9", "nft")``; ``"iptables v1.6.1"`` -> legacy."""
    match = _VERSION_RE.search(text or "")
    if not match:
        return None, None
    mode = {"nf_tables": "nft", "legacy": "legacy", None: "legacy"}[match.group(2)]
    return match.group(1), mode


def _tool(ip_version: int, suffix: str) -> str:
    return ("iptables" if ip_version == 4 else "ip6tables") + suffix


def backend_commands(backend: str, ip_version: int = 4, runner: Optional[Runner] = None,
                     reason: str = "chosen by the operator") -> IptablesBackend:
    """Commands of a given backend. Raises ValueError when that backend's tools are not installed.

    Prefers the explicit ``iptables-legacy*``/``iptables-nft*`` names; falls back to the plain names
    only when the plain ``iptables`` *is* that backend (distributions before 1.8 ship only those).
    """
    if backend not in BACKENDS:
        raise ValueError(f"iptables backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    run = runner or _run
    default_version, default_mode = _default_mode(ip_version, run)
    names = {}
    for part in ("", "-save", "-restore"):
        explicit = which(_tool(ip_version, f"-{backend}{part}"))
        plain = which(_tool(ip_version, part)) if default_mode == backend else None
        names[part] = explicit or plain
    if not all(names.values()):
        missing = _tool(ip_version, f"-{backend}")
        raise ValueError(
            f"the {backend} iptables backend is not installed ({missing}, {missing}-save and "
            f"{missing}-restore not found); install the iptables package that provides it, or use "
            f"backend: auto"
        )
    version = default_version
    if default_mode != backend:
        rc, out = run([names[""], "--version"])
        version = parse_version(out)[0] if rc == 0 else None
    return IptablesBackend(backend=backend, version=version, iptables=names[""], save=names["-save"],
                           restore=names["-restore"], ip_version=ip_version, reason=reason)


def _default_mode(ip_version: int, run: Runner) -> Tuple[Optional[str], Optional[str]]:
    default = which(_tool(ip_version, ""))
    if not default:
        return None, None
    rc, out = run([default, "--version"])
    return parse_version(out) if rc == 0 else (None, None)


def _save_output(backend: str, ip_version: int, run: Runner,
                 default_mode: Optional[str]) -> Optional[str]:
    save = which(_tool(ip_version, f"-{backend}-save"))
    if not save and default_mode == backend:
        save = which(_tool(ip_version, "-save"))
    if not save:
        return None
    rc, out = run([save])
    return out if rc == 0 else None


def _count_rules(dump: Optional[str]) -> int:
    if dump is None:
        return -1
    return sum(1 for line in dump.splitlines() if line.startswith("-A "))


def _table_names(dump: Optional[str]) -> List[str]:
    if not dump:
        return []
    return sorted(line[1:].strip() for line in dump.splitlines() if line.startswith("*"))


def _has_chain(dump: Optional[str], predicate: Callable[[str], bool]) -> bool:
    if not dump:
        return False
    return any(line.startswith(":") and predicate(line[1:].split(" ", 1)[0]) for line in dump.splitlines())


def detect_iptables_backend(ip_version: int = 4, runner: Optional[Runner] = None) -> IptablesBackend:
    """Detect the backend this host (the current network namespace) uses; see the module docstring.

    Never raises for a host without iptables: returns ``backend="none"`` with all commands None.
    """
    if ip_version not in (4, 6):
        raise ValueError(f"ip_version must be 4 or 6, not {ip_version!r}")
    run = runner or _run
    default_version, default_mode = _default_mode(ip_version, run)
    dumps = {b: _save_output(b, ip_version, run, default_mode) for b in BACKENDS}
    counts = {b: _count_rules(dumps[b]) for b in BACKENDS}
    tables = {b: _table_names(dumps[b]) for b in BACKENDS}
    available = [b for b in BACKENDS if dumps[b] is not None or default_mode == b]
    if not available:
        return IptablesBackend(backend="none", version=None, iptables=None, save=None, restore=None,
                               ip_version=ip_version, rule_counts=counts, tables=tables,
                               reason=f"no {_tool(ip_version, '')} command is installed")

    def pick(backend: str, reason: str) -> IptablesBackend:
        chosen = backend_commands(backend, ip_version, run, reason)
        return replace(chosen, rule_counts=counts, tables=tables)

    owned = [b for b in BACKENDS if _has_chain(dumps[b], lambda c: c.startswith(OWNED_CHAIN_PREFIX))]
    if len(owned) == 1:
        return pick(owned[0], f"{owned[0]} already holds the ztmesh chains ({OWNED_CHAIN_PREFIX}*)")
    hinted = [b for b in BACKENDS if _has_chain(dumps[b], lambda c: c == KUBE_HINT_CHAIN)]
    if len(hinted) == 1:
        return pick(hinted[0], f"{hinted[0]} holds the Kubernetes hint chain {KUBE_HINT_CHAIN}")
    if counts["legacy"] != counts["nft"] and max(counts.values()) > 0:
        busiest = "legacy" if counts["legacy"] > counts["nft"] else "nft"
        return pick(busiest, f"{busiest} holds more rules (legacy {counts['legacy']}, "
                             f"nft {counts['nft']})")
    if default_mode in available:
        return pick(default_mode, f"no rules in either backend; {_tool(ip_version, '')} "
                                  f"{default_version} defaults to {default_mode}")
    return pick(available[0], f"no rules in either backend; only {available[0]} is installed")
