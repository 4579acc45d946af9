"""Filters that render the mesh state (the renderer itself: module_utils/ztmesh_mesh_state.py).

``ztmesh_fleet | ztmesh.mesh.ztmesh_mesh_state_file`` is the sealed file roles/ztmesh_state writes.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_mesh_state import mesh_state, mesh_state_file


def _ansible_errors(function: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    def wrapped(fleet: Mapping[str, Any]) -> Any:
        try:
            return function(fleet)
        except ValueError as exc:
            from ansible.errors import AnsibleFilterError

            raise AnsibleFilterError(str(exc)) from None

    return wrapped


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> Dict[str, Callable]:
        return {"ztmesh_mesh_state": _ansible_errors(mesh_state),
                "ztmesh_mesh_state_file": _ansible_errors(mesh_state_file)}
