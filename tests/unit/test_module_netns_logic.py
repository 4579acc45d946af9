"""ztmesh_netns without root: validation of the namespace name and the veth pair."""

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


netns_module = load_module("ztmesh_netns")


# ----------------------------------------------------------------- netns parameters

def test_netns_name_and_veth_validation():
    good = {"name": "ztproxy", "netns": None, "veth": {"host_ifname": "ztproxy0", "peer_ifname": "eth0",
                                                      "host_address": "192.168.125.1/30",
                                                      "peer_address": None, "mtu": None}}
    assert netns_module.validate(good)["veth"]["host_address"] == "192.168.125.1/30"
    for bad, fragment in (({"name": "a/b"}, "valid namespace name"), ({"netns": "ztproxy"}, "outside"),
                          ({"veth": {**good["veth"], "mtu": 10}}, "mtu")):
        with pytest.raises(ValueError, match=fragment):
            netns_module.validate({**good, **bad})
