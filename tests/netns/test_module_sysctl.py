"""ztmesh_sysctl against the real kernel. Values are set in throwaway namespaces (their /proc/sys/net is
their own); the root namespace's values are read to prove they never change. The persist-file tests run
in the root namespace with a key of an interface that does not exist, so only their own file is written."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from ansible_module import run_module

pytestmark = pytest.mark.timeout(120)

ROOT_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
ROOT_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def read_in(sh, netns: str, key: str) -> str:
    return " ".join(sh("cat", "/proc/sys/" + key.replace(".", "/"), netns=netns).stdout.split())


def read_root(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return " ".join(handle.read().split())


@pytest.fixture
def netns(netns, sh) -> str:
    """The conftest namespace with ip_forward 0: a new namespace copies the root namespace's value."""
    sh("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward", netns=netns)
    return netns


@pytest.fixture
def tunnel_ns(netns, sh) -> str:
    """A namespace with a link named istioin, for per-interface keys."""
    sh("ip", "link", "add", "istioin", "type", "vxlan", "id", "1000", "remote", "192.0.2.1",
       "dstport", "4789", netns=netns)
    return netns


def test_applies_values_in_the_namespace_only(tunnel_ns, sh):
    root_paths = (ROOT_IP_FORWARD, ROOT_PORT_RANGE)
    root_before = [read_root(path) for path in root_paths]
    sysctls = {"net.ipv4.ip_forward": 1, "net.ipv4.conf.istioin.rp_filter": 0,
               "net.ipv4.conf.istioin.accept_local": True, "net.ipv4.ip_local_port_range": "20000   30000"}
    previous = {key: read_in(sh, tunnel_ns, key) for key in sysctls}
    result = run_module("ztmesh_sysctl", {"sysctls": sysctls, "netns": tunnel_ns})
    assert result.get("failed") is not True, result.get("msg")
    assert result["changed"] is True
    assert result["previous"] == previous
    assert read_in(sh, tunnel_ns, "net.ipv4.ip_forward") == "1"
    assert read_in(sh, tunnel_ns, "net.ipv4.conf.istioin.accept_local") == "1"
    assert read_in(sh, tunnel_ns, "net.ipv4.ip_local_port_range") == "20000 30000"
    assert result["current"]["net.ipv4.ip_local_port_range"] == "20000 30000"
    assert set(result["changed_keys"]) == {k for k in sysctls if previous[k] != result["current"][k]}
    assert [read_root(path) for path in root_paths] == root_before
    assert root_before[1] != "20000 30000"  # the root value differs, so the check above means something


def test_second_run_changes_nothing(netns):
    args = {"sysctls": {"net.ipv4.ip_forward": "1", "net.ipv4.ip_local_port_range": "20000 30000"},
            "netns": netns}
    run_module("ztmesh_sysctl", args)
    again = run_module("ztmesh_sysctl", args)
    assert again["changed"] is False and again["changed_keys"] == []


def test_drift_is_repaired(netns, sh):
    args = {"sysctls": {"net.ipv4.ip_forward": 1}, "netns": netns}
    run_module("ztmesh_sysctl", args)
    sh("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward", netns=netns)
    result = run_module("ztmesh_sysctl", args)
    assert result["changed"] is True and result["previous"] == {"net.ipv4.ip_forward": "0"}
    assert read_in(sh, netns, "net.ipv4.ip_forward") == "1"


def test_check_mode_and_diff(netns, sh):
    result = run_module("ztmesh_sysctl", {"sysctls": {"net.ipv4.ip_forward": 1}, "netns": netns},
                        check=True, diff=True)
    assert result["changed"] is True and result["changed_keys"] == ["net.ipv4.ip_forward"]
    assert read_in(sh, netns, "net.ipv4.ip_forward") == "0"
    assert result["diff"]["before"]["sysctls"] == {"net.ipv4.ip_forward": "0"}
    assert result["diff"]["after"]["sysctls"] == {"net.ipv4.ip_forward": "1"}


def test_absent_restores_previous_values(tunnel_ns, sh):
    installed = run_module("ztmesh_sysctl", {"sysctls": {"net.ipv4.ip_forward": 1,
                                                         "net.ipv4.conf.istioin.rp_filter": 0},
                                             "netns": tunnel_ns})
    restored = run_module("ztmesh_sysctl", {"sysctls": installed["previous"], "state": "absent",
                                            "netns": tunnel_ns})
    assert restored["changed"] is True
    for key, value in installed["previous"].items():
        assert read_in(sh, tunnel_ns, key) == value


def test_missing_key_fails_unless_ignored(netns, sh):
    args = {"sysctls": {"net.ipv4.ip_forward": 1, "net.ipv4.conf.istioout.rp_filter": 0}, "netns": netns}
    failed = run_module("ztmesh_sysctl", args)
    assert failed["failed"] is True
    assert "net.ipv4.conf.istioout.rp_filter" in failed["msg"] and "ignore_missing" in failed["msg"]
    assert read_in(sh, netns, "net.ipv4.ip_forward") == "0"

    result = run_module("ztmesh_sysctl", {**args, "ignore_missing": True})
    assert result["changed"] is True
    assert result["missing_keys"] == ["net.ipv4.conf.istioout.rp_filter"]
    assert list(result["previous"]) == ["net.ipv4.ip_forward"]


def test_value_refused_by_kernel_rolls_back(netns, sh):
    # ip_local_port_range must be ascending: the kernel refuses the second write, after the first
    # key was already changed; the module must put that one back.
    result = run_module("ztmesh_sysctl", {"sysctls": {"net.ipv4.ip_forward": 1,
                                                      "net.ipv4.ip_local_port_range": "30000 20000"},
                                          "netns": netns})
    assert result["failed"] is True and "refused net.ipv4.ip_local_port_range" in result["msg"]
    assert read_in(sh, netns, "net.ipv4.ip_forward") == "0"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"sysctls": {"net..ipv4.ip_forward": 1}}, "malformed"),
        ({"sysctls": {"net/ipv4/ip_forward": 1}}, "contains '/'"),
        ({"sysctls": {"net.ipv4.ip_forward": "1\nkernel.panic = 1"}}, "single line"),
        ({"sysctls": {}}, "empty"),
        ({"sysctls": {"net.ipv4.ip_forward": 1, "kernel.panic": 0}}, "not per-namespace"),
        ({"sysctls": {"net.ipv4.ip_forward": 1}, "persist": "/etc/sysctl.d/90-ztmesh.conf"}, "netns"),
    ],
)
def test_bad_input_fails_and_changes_nothing(netns, sh, args, fragment):
    result = run_module("ztmesh_sysctl", {**args, "netns": netns})
    assert result["failed"] is True and fragment in result["msg"]
    assert read_in(sh, netns, "net.ipv4.ip_forward") == "0"


@pytest.fixture
def persist_path() -> Iterator[str]:
    path = f"/etc/sysctl.d/99-ztmesh-test-{os.getpid()}.conf"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_persist_file_holds_exactly_the_keys(persist_path):
    # Root namespace, so the key names an interface that does not exist: with ignore_missing the module
    # writes no value at all, only its file.
    key = f"net.ipv4.conf.ztno{os.getpid() % 100000}.rp_filter"
    args = {"sysctls": {key: 0}, "persist": persist_path, "ignore_missing": True}
    check = run_module("ztmesh_sysctl", args, check=True, diff=True)
    assert check["changed"] is True and check["changed_keys"] == [] and not os.path.exists(persist_path)
    assert f"-{key} = 0" in check["diff"]["after"]["persist"]["content"]
    assert check["diff"]["before"]["persist"]["content"] is None

    result = run_module("ztmesh_sysctl", args)
    assert result["changed"] is True and result["persist_changed"] is True
    assert (result["changed_keys"], result["missing_keys"], result["previous"]) == ([], [key], {})
    with open(persist_path, encoding="utf-8") as handle:
        lines = [line for line in handle.read().splitlines() if not line.startswith("#")]
    assert lines == [f"-{key} = 0"]
    assert oct(os.stat(persist_path).st_mode & 0o777) == "0o644"
    assert run_module("ztmesh_sysctl", args)["changed"] is False

    with open(persist_path, "a", encoding="utf-8") as handle:
        handle.write("net.ipv4.conf.all.rp_filter = 2\n")  # drift: a key ztmesh does not own
    assert run_module("ztmesh_sysctl", args)["changed"] is True
    with open(persist_path, encoding="utf-8") as handle:
        assert "all.rp_filter" not in handle.read()

    removed = run_module("ztmesh_sysctl", {**args, "state": "absent"})
    assert removed["changed"] is True and not os.path.exists(persist_path)
    assert run_module("ztmesh_sysctl", {**args, "state": "absent"})["changed"] is False


@pytest.mark.parametrize("path", ["/etc/sysctl.conf", "/etc/sysctl.d/sub/x.conf", "/etc/sysctl.d/x.txt",
                                  "/etc/sysctl.d/../passwd.conf", "relative.conf"])
def test_persist_outside_sysctl_d_is_refused(path):
    result = run_module("ztmesh_sysctl", {"sysctls": {"net.ipv4.conf.ztnothere.rp_filter": 0},
                                          "persist": path, "ignore_missing": True})
    assert result["failed"] is True and "/etc/sysctl.d/" in result["msg"]
    assert not os.path.exists("/etc/sysctl.d/sub/x.conf") and not os.path.exists("/etc/sysctl.d/x.txt")
