"""Interface names, IPv4 addresses and the address plan of module_utils/ztmesh_links.py (used by
ztmesh_tunnel and ztmesh_netns): no root, no kernel objects."""

from __future__ import annotations

import pytest

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_links as links

# ----------------------------------------------------------------- names and addresses

@pytest.mark.parametrize("name", ["istioin", "a", "x" * 15, "eth0-1", "v@1"])
def test_valid_interface_names(name):
    assert links.ifname_error(name) is None


@pytest.mark.parametrize("name", ["", "x" * 16, "a b", "a/b", "a:b", ".", ".."])
def test_invalid_interface_names(name):
    assert links.ifname_error(name)


def test_cidr_parsing():
    assert str(links.parse_ipv4_cidr("192.168.126.1/30", "address")) == "192.168.126.1/30"
    assert str(links.parse_ipv4_cidr("10.0.0.0/31", "address")) == "10.0.0.0/31"  # RFC 3021 pairs
    for bad in ("192.168.126.1", "192.168.126.0/30", "192.168.126.3/30", "fe80::1/64", "1.2.3.4/33"):
        with pytest.raises(ValueError):
            links.parse_ipv4_cidr(bad, "address")


def test_exact_address_plan():
    assert links.exact_address_plan(["10.0.0.1/24", "192.168.126.1/30"], ["192.168.126.1/30"]) == (
        [], ["10.0.0.1/24"])
    assert links.exact_address_plan(["192.168.126.1/29"], ["192.168.126.1/30"]) == (
        ["192.168.126.1/30"], ["192.168.126.1/29"])


def test_missing_kind_message_names_config_and_other_kind():
    message = links.missing_kind_message("geneve", "vxlan")
    assert "CONFIG_GENEVE" in message and "ztmesh_tunnel_kind: vxlan" in message
