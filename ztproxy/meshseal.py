"""The seal of a rendered mesh state file: proof that the file is whole.

A YAML document cut at an entry boundary is still valid YAML, and an empty file is a valid empty
document: both used to load as a smaller mesh (every workload gone, so connections to them went out as
plaintext passthrough). The renderer (``playbooks/filter_plugins/ztmesh_state.py``, role
``ztmesh_state``) therefore frames the document with two comment lines, which ztunnel's own loader
ignores, so one file still serves ztunnel and ztproxy::

    # ztmesh-mesh-state v1 ...                      first line: this file is sealed
    <the YAML document>
    # ztmesh-mesh-state-end workloads=12 services=3 policies=4 sha256=<64 hex digits>

The SHA-256 covers every byte before the last line, so a file cut anywhere (it loses the last line),
edited by hand or appended to (the last line is no longer the seal) is refused. The counts repeat what
the document holds, for the error message and as a second check. A file without the first line is
hand-written: it is not sealed and is accepted as it is, except when it holds no document at all.

docs/ztproxy.md ("Mesh state integrity") describes the format; the renderer writes exactly this, and
``tests/unit/test_mesh_state_seal.py`` checks both sides against each other.
"""

from __future__ import annotations

import hashlib
import re
from typing import Dict, Optional

SEAL_HEADER = "# ztmesh-mesh-state v1"
SEAL_TRAILER = "# ztmesh-mesh-state-end"
SECTIONS = ("workloads", "services", "policies")
_TRAILER_RE = re.compile(
    r"^# ztmesh-mesh-state-end workloads=(\d+) services=(\d+) policies=(\d+) sha256=([0-9a-f]{64})\n?$"
)


class SealError(ValueError):
    """The file is not whole: the message says what is missing and what to do."""


def is_sealed(raw: bytes) -> bool:
    """Whether the file declares itself sealed (first line), whatever state the rest is in."""
    return raw.startswith(SEAL_HEADER.encode())


def verify(raw: bytes) -> Optional[Dict[str, int]]:
    """The counts the seal promises (None for an unsealed, hand-written file); SealError if the file is
    sealed but not whole."""
    if not is_sealed(raw):
        return None
    body_end = raw.rstrip(b"\n").rfind(b"\n") + 1
    last = raw[body_end:]
    match = _TRAILER_RE.match(last.decode("utf-8", "replace"))
    if not match:
        raise SealError(
            f"it starts with '{SEAL_HEADER}' but does not end with the '{SEAL_TRAILER} ...' line the "
            f"renderer writes last: the file is incomplete (cut short, or changed after rendering); re-run "
            f"playbooks/refresh-state.yml"
        )
    digest = hashlib.sha256(raw[:body_end]).hexdigest()
    if digest != match.group(4):
        raise SealError(
            f"its content does not match its seal (sha256 {digest[:12]}..., the seal says "
            f"{match.group(4)[:12]}...): the file was cut or changed after rendering; re-run "
            f"playbooks/refresh-state.yml"
        )
    return {name: int(match.group(i + 1)) for i, name in enumerate(SECTIONS)}


def check_counts(expected: Optional[Dict[str, int]], data: object) -> None:
    """After parsing: the document holds as many entries as the seal says."""
    if expected is None:
        return
    found = {
        name: len(data.get(name) or []) if isinstance(data, dict) else 0 for name in SECTIONS  # type: ignore
    }
    if found != expected:
        wrong = ", ".join(f"{name} {found[name]} of {expected[name]}" for name in SECTIONS
                          if found[name] != expected[name])
        raise SealError(f"it holds fewer or more entries than its seal says ({wrong})")


def seal(document: str) -> str:
    """Frame a rendered YAML document (used by tests and tools; the Ansible renderer has its own copy of
    this format because it runs on the controller without ztproxy installed)."""
    import yaml

    data = yaml.safe_load(document) or {}
    counts = " ".join(f"{name}={len(data.get(name) or [])}" for name in SECTIONS)
    body = f"{SEAL_HEADER}\n{document if document.endswith(chr(10)) else document + chr(10)}"
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f"{body}{SEAL_TRAILER} {counts} sha256={digest}\n"
