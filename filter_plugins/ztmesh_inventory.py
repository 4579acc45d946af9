"""Filters of the ztmesh inventory model (the model itself: module_utils/ztmesh_inventory.py).

``hostvars | ztmesh.mesh.ztmesh_fleet(groups['ztmesh_nodes'])`` returns the normalized fleet and the
errors found (playbooks/validate.yml); the other filters are the per-node views the roles and playbooks
read from it, and the messages validate.yml prints.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, Mapping, Sequence

from ansible_collections.ztmesh.mesh.plugins.module_utils.ztmesh_inventory import (
    INVENTORY_DEFAULTS,
    address_variables,
    build_fleet,
    identity_dirs,
    node_contained_ips,
    node_enrollments,
    node_host_ips,
    node_identities,
    node_workload_ips,
    role_options,
    sign_requests,
    signed_chain,
)


def _hostvars_view(hostvars: Any, hosts: Sequence[str]) -> Dict[str, Mapping[str, Any]]:
    """Only the variables this model reads, so Ansible templates nothing else."""
    names = set(INVENTORY_DEFAULTS) | {"ztmesh_node_name"}
    view: Dict[str, Dict[str, Any]] = {}
    for host in hosts:
        host_vars = hostvars[host]
        view[host] = {name: host_vars[name] for name in names if name in host_vars}
        for name in address_variables():
            if name not in host_vars:
                continue
            try:
                view[host][name] = host_vars[name]
            except Exception:  # noqa: BLE001 -- e.g. a value built from facts, which validate.yml does not
                continue       # gather: the role checks it on the node
    return view


def _fleet_filter(hostvars: Any, hosts: Sequence[str]) -> dict:
    """The ztmesh_fleet filter: names of every host's variables (keys only: nothing is templated) for the
    misspelling check, the values of the ones the model reads; warnings go to Ansible's output."""
    hosts = list(hosts or [])
    names = {host: [str(n) for n in hostvars[host]] for host in hosts}
    fleet = build_fleet(_hostvars_view(hostvars, hosts), hosts, variable_names=names)
    if fleet.get("warnings"):
        from ansible.utils.display import Display

        for warning in fleet["warnings"]:
            Display().warning(warning)
    return fleet


def missing_nodes_message(groups: Mapping[str, Any]) -> str:
    """Why no play would run: group ztmesh_nodes is missing or empty, and the group the operator may
    have meant."""
    others = sorted(g for g, members in groups.items()
                    if g not in ("all", "ungrouped", "ztmesh_nodes") and members)
    close = difflib.get_close_matches("ztmesh_nodes", others, n=1, cutoff=0.5)
    hint = f" Did you mean group {close[0]}? Rename it to ztmesh_nodes." if close else ""
    return (f"the inventory has no host in group ztmesh_nodes, so every play of ztmesh would match no host "
            f"and change nothing.{hint} Put every mesh node in group ztmesh_nodes (docs/inventory.md); "
            f"groups with hosts in this inventory: {', '.join(others) or 'none'}")


def role_argument_errors(results: Sequence[Mapping[str, Any]], host: str) -> List[str]:
    """validate_argument_spec results (registered, failures kept) -> one line per wrong variable, naming
    the host, the role and Ansible's message (which names the variable and the allowed values), instead
    of the whole argument spec Ansible prints with a failure."""
    lines = []
    for result in results or ():
        role = result.get("item", "?")
        for message in result.get("argument_errors") or ():
            lines.append(f"host {host}: role {role}: {message}")
        if result.get("failed_check") and not result.get("argument_errors"):
            lines.append(f"host {host}: role {role}: {result.get('msg', 'argument check failed')}")
    return lines


class FilterModule:
    """Ansible entry point: the filters of the inventory model."""

    def filters(self) -> Dict[str, Callable]:
        return {
            "ztmesh_fleet": _fleet_filter,
            "ztmesh_missing_nodes_message": missing_nodes_message,
            "ztmesh_role_argument_errors": role_argument_errors,
            "ztmesh_node_workload_ips": node_workload_ips,
            "ztmesh_node_contained_ips": node_contained_ips,
            "ztmesh_node_host_ips": node_host_ips,
            "ztmesh_node_identities": node_identities,
            "ztmesh_node_enrollments": node_enrollments,
            "ztmesh_sign_requests": sign_requests,
            "ztmesh_signed_chain": signed_chain,
            "ztmesh_identity_dirs": identity_dirs,
            "ztmesh_role_options": role_options,
        }
