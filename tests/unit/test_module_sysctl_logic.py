"""ztmesh_sysctl without root: keys, values and the persist file (module_utils/ztmesh_sysctl.py)."""

from __future__ import annotations

import pytest

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_sysctl as sysctl

# ----------------------------------------------------------------- sysctl keys, values, persist file

@pytest.mark.parametrize("key", ["net.ipv4.ip_forward", "net.ipv4.conf.istioin.rp_filter",
                                 "net.ipv6.conf.eth0-1.disable_ipv6", "kernel.panic"])
def test_valid_sysctl_keys(key):
    assert sysctl.key_error(key) is None


@pytest.mark.parametrize("key", ["", "net", "net..ipv4", ".net.ipv4", "net.ipv4.", "net/ipv4/ip_forward",
                                 "net.ipv4.ip forward", "../../etc/passwd"])
def test_invalid_sysctl_keys(key):
    assert sysctl.key_error(key)


def test_values_are_normalised():
    assert sysctl.normalize("20000\t30000") == sysctl.normalize(" 20000   30000 ") == "20000 30000"
    assert sysctl.normalize(True) == "1" and sysctl.normalize(False) == "0" and sysctl.normalize(0) == "0"
    assert sysctl.value_error("k", "1\n2") and sysctl.value_error("k", "  ") and sysctl.value_error("k", None)


@pytest.mark.parametrize("path", ["/etc/sysctl.d/90-ztmesh.conf", "/etc/sysctl.d/ztmesh.conf"])
def test_persist_path_accepted(path):
    assert sysctl.persist_path_error(path) is None


@pytest.mark.parametrize("path", ["/etc/sysctl.conf", "/etc/sysctl.d/a/b.conf", "/etc/sysctl.d/x.txt",
                                  "/etc/sysctl.d/../x.conf", "etc/sysctl.d/x.conf", "/etc/sysctl.d/.conf",
                                  "/etc/sysctl.d//x.conf"])
def test_persist_path_refused(path):
    assert "/etc/sysctl.d/" in sysctl.persist_path_error(path)


def test_persist_file_holds_exactly_the_values():
    values = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.istioin.rp_filter": "0"}
    content = sysctl.render_persist(values, False)
    body = [line for line in content.splitlines() if not line.startswith("#")]
    assert body == ["net.ipv4.ip_forward = 1", "net.ipv4.conf.istioin.rp_filter = 0"]
    tolerant = sysctl.render_persist({"net.ipv4.conf.istioin.rp_filter": "0"}, True)
    assert "-net.ipv4.conf.istioin.rp_filter = 0" in tolerant
