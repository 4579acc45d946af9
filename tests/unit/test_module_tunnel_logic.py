"""ztmesh_tunnel without root: parameter validation, default ports, identity differences and the
attributes a link is created with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_ztmesh_unit_{name}", REPO / "modules" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tunnel = load_module("ztmesh_tunnel")


# ----------------------------------------------------------------- tunnel parameters

def tunnel_params(**overrides) -> dict:
    params = {"name": "istioin", "kind": "geneve", "vni": 1000, "remote": "192.168.125.2", "local": None,
              "port": None, "address": "192.168.126.1/30", "mtu": None, "link_state": "up", "force": True,
              "state": "present", "netns": None}
    params.update(overrides)
    return params


def test_tunnel_default_ports():
    assert tunnel.desired_link(tunnel_params())["port"] == 6081
    assert tunnel.desired_link(tunnel_params(kind="vxlan"))["port"] == 4789


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"vni": -1}, "out of range"),
        ({"vni": 2 ** 24}, "out of range"),
        ({"vni": None}, "required"),
        ({"remote": "0.0.0.0"}, "unicast"),
        ({"port": 0}, "UDP port"),
        ({"local": "10.0.0.1"}, "only supported by kind: vxlan"),
        ({"mtu": 20}, "mtu"),
        ({"name": "istioin-too-long"}, "at most 15"),
    ],
)
def test_tunnel_rejects_bad_parameters(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        tunnel.desired_link(tunnel_params(**overrides))


def test_tunnel_identity_differences_name_each_field():
    want = tunnel.desired_link(tunnel_params(kind="vxlan"))
    current = {**want, "vni": 7, "remote": "10.0.0.9"}
    assert tunnel.identity_differences(current, want) == [
        "vni 7 (wanted 1000)", "remote 10.0.0.9 (wanted 192.168.125.2)"]


def test_tunnel_create_attrs_per_kind():
    geneve = tunnel.create_attrs(tunnel.desired_link(tunnel_params(mtu=1450)))
    assert geneve == {"geneve_id": 1000, "geneve_port": 6081, "geneve_remote": "192.168.125.2", "mtu": 1450}
    vxlan = tunnel.create_attrs(tunnel.desired_link(tunnel_params(kind="vxlan", local="192.168.125.1")))
    assert vxlan == {"vxlan_id": 1000, "vxlan_port": 4789, "vxlan_group": "192.168.125.2",
                     "vxlan_local": "192.168.125.1"}
