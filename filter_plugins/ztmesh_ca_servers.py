"""Filters for the signing services (roles/ztmesh_ca, tasks choose_servers.yml)."""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, Iterable, List, Mapping


def ca_server_addresses(servers: Iterable[Mapping[str, Any]], port: Any) -> List[str]:
    """'address:port' of each signing service host (its hostvars): ztmesh_ca_server_address when set,
    else the default IPv4 address looked up on it. IPv6 addresses are bracketed."""
    out: List[str] = []
    for host in servers:
        address = host.get("ztmesh_ca_server_address")
        if address is None:
            address = host["ansible_facts"]["default_ipv4"]["address"]
        address = str(address)
        try:
            if ipaddress.ip_address(address).version == 6:
                address = f"[{address}]"
        except ValueError:  # a DNS name: the nodes resolve it
            pass
        out.append(f"{address}:{int(port)}")
    return out


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> Dict[str, Callable]:
        return {"ztmesh_ca_server_addresses": ca_server_addresses}
