"""Which identities the mesh state places on which node: the signing service's authorization source.

The file is read by the proxy's own parser (ztproxy.state, strict: unknown keys, a bad identity or a
bad policy make the whole file invalid), so the signing service and the proxies always agree about the
same file; only the node placements are taken from it here. A workload without ``node`` (for example a
Kubernetes pod that ztunnel serves) is nobody's here. The file is re-read when it changes; a file that
cannot be parsed keeps the last good state (and says so), so a bad render never opens anything up.
"""

from __future__ import annotations

import logging
from typing import Dict, FrozenSet, Optional, Set

from ..state import MeshState as ProxyMeshState
from ..state import MeshStateError, MeshStateWatcher, parse_mesh_state_bytes
from .pki import DEFAULT_TRUST_DOMAIN, SpiffeId

log = logging.getLogger("ztproxy.identity.meshstate")

Placements = Dict[str, FrozenSet[SpiffeId]]

__all__ = ["MeshState", "MeshStateError", "Placements", "parse_placements", "placements_of"]


def placements_of(state: ProxyMeshState) -> Placements:
    """node name -> identities of the workloads on that node."""
    placements: Dict[str, Set[SpiffeId]] = {}
    for workload in state.workloads:
        if workload.node:
            placements.setdefault(workload.node, set()).add(workload.spiffe_id)
    return {node: frozenset(ids) for node, ids in placements.items()}


def parse_placements(text: str, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                     source: str = "mesh state") -> Placements:
    """The placements of a mesh state file's text; MeshStateError as ztproxy.state refuses it."""
    return placements_of(parse_mesh_state_bytes(text.encode("utf-8"), trust_domain, source))


class MeshState:
    """The placements of a mesh state file, reloaded when the file changes."""

    def __init__(self, path: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.path = path
        self.trust_domain = trust_domain
        self._watcher = MeshStateWatcher(path, trust_domain)
        self._generation: Optional[int] = None
        self._placements: Placements = {}
        self._load()

    def _load(self) -> None:
        self._watcher.poll()
        if self._generation == self._watcher.generation:
            return
        self._generation = self._watcher.generation
        self._placements = placements_of(self._watcher.current)
        log.info("mesh state %s: %d nodes, %d identities", self.path, len(self._placements),
                 len(set().union(*self._placements.values())) if self._placements else 0)

    def identities_on(self, node: str) -> FrozenSet[SpiffeId]:
        self._load()
        return self._placements.get(node, frozenset())

    def has_node(self, node: str) -> bool:
        self._load()
        return node in self._placements
