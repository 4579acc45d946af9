"""Which identities the mesh state places on which node: the signing service's authorization source.

The mesh state is ztunnel's local configuration file (``LOCAL_XDS_PATH``: top-level ``workloads``,
``services``, ``policies``). Only the workload fields that decide identity are read here: ``node``,
``namespace``, ``serviceAccount`` and ``trustDomain``. The file is re-read when it changes; a file that
cannot be parsed keeps the last good state (and says so), so a bad render never opens anything up.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, FrozenSet, Optional, Set, Tuple

import yaml

from .. import meshseal
from .pki import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId

log = logging.getLogger("ztproxy.identity.meshstate")

# ztunnel's defaults for a workload that omits them.
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"


class MeshStateError(IdentityError):
    """The mesh state file cannot be used."""


def parse_placements(
    text: str, trust_domain: str = DEFAULT_TRUST_DOMAIN, source: str = "mesh state"
) -> Dict[str, FrozenSet[SpiffeId]]:
    """node name -> identities of the workloads on that node. An empty or no longer whole file (see
    ztproxy.meshseal) is refused like an invalid one, so the last good placements stay in force."""
    raw = text.encode("utf-8")
    try:
        expected = meshseal.verify(raw)
    except meshseal.SealError as exc:
        raise MeshStateError(f"{source}: refused: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MeshStateError(f"{source} is not valid YAML: {exc}") from exc
    if data is None:
        raise MeshStateError(f"{source} is empty: refused (a partial write leaves such a file)")
    try:
        meshseal.check_counts(expected, data)
    except meshseal.SealError as exc:
        raise MeshStateError(f"{source}: refused: {exc}") from exc
    if not isinstance(data, dict):
        raise MeshStateError(f"{source} must be a mapping with 'workloads' (ztunnel's local config format)")
    workloads = data.get("workloads") or []
    if not isinstance(workloads, list):
        raise MeshStateError(f"'workloads' in {source} must be a list")
    placements: Dict[str, Set[SpiffeId]] = {}
    for index, workload in enumerate(workloads):
        if not isinstance(workload, dict):
            raise MeshStateError(f"workloads[{index}] in {source} must be a mapping")
        node = workload.get("node")
        if not node:
            continue  # a workload outside the ztmesh nodes (e.g. a Kubernetes pod): nobody here renews it
        try:
            identity = SpiffeId.of(
                str(workload.get("trustDomain") or trust_domain),
                str(workload.get("namespace") or DEFAULT_NAMESPACE),
                str(workload.get("serviceAccount") or DEFAULT_SERVICE_ACCOUNT),
            )
        except IdentityError as exc:
            raise MeshStateError(
                f"workloads[{index}] ({workload.get('name', '?')}) in {source}: {exc}"
            ) from exc
        placements.setdefault(str(node), set()).add(identity)
    return {node: frozenset(ids) for node, ids in placements.items()}


def _file_signature(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class MeshState:
    """The placements of a mesh state file, reloaded when the file changes."""

    def __init__(self, path: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.path = path
        self.trust_domain = trust_domain
        self._signature: Optional[Tuple[int, int, int]] = None
        self._placements: Dict[str, FrozenSet[SpiffeId]] = {}
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        signature = _file_signature(self.path)
        if signature == self._signature and not initial:
            return
        try:
            if signature is None:
                raise MeshStateError(f"mesh state {self.path} does not exist")
            with open(self.path, encoding="utf-8") as handle:
                placements = parse_placements(handle.read(), self.trust_domain, self.path)
        except (OSError, MeshStateError) as exc:
            if initial:
                raise MeshStateError(str(exc)) from exc
            log.error("keeping the previous mesh state: %s", exc)
            self._signature = signature
            return
        self._signature = signature
        self._placements = placements
        log.info(
            "mesh state %s: %d nodes, %d identities",
            self.path,
            len(placements),
            len(set().union(*placements.values())) if placements else 0,
        )

    def identities_on(self, node: str) -> FrozenSet[SpiffeId]:
        self._load()
        return self._placements.get(node, frozenset())

    def has_node(self, node: str) -> bool:
        self._load()
        return node in self._placements
