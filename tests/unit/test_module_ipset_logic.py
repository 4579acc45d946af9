"""ztmesh_ipset without root: member validation, ipset save parsing and the swap-based plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.ztmesh.mesh.plugins.module_utils import ztmesh_ipset as ips

REPO = Path(__file__).resolve().parents[2]

SAVE = """create s1 hash:ip family inet hashsize 2048 maxelem 65536 timeout 0 comment bucketsize 12 initval 0
add s1 10.0.0.2 timeout 0 comment "ztmesh"
add s1 10.0.0.1 timeout 0 comment "x y"
create n1 hash:net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xd969eb96
add n1 10.1.0.1
add n1 10.0.0.0/24
"""


def spec(**kw) -> ips.SetSpec:
    params = {"name": "s1", "type": "hash:ip", "family": "inet", "options": {}, "members": []}
    params.update(kw)
    return ips.spec_from_params(params)


def test_parse_save_reads_header_members_and_comments() -> None:
    sets = ips.parse_save(SAVE)
    assert sets["s1"].type == "hash:ip"
    assert sets["s1"].header["maxelem"] == "65536" and "comment" in sets["s1"].header
    assert sets["s1"].members == {"10.0.0.2": "ztmesh", "10.0.0.1": "x y"}
    assert ips.comparable_header(sets["s1"]) == {
        "family": "inet",
        "maxelem": "65536",
        "timeout": "0",
        "comment": None,
    }
    assert sets["n1"].members == {"10.1.0.1": None, "10.0.0.0/24": None}


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"members": ["10.0.0.0/24"]}, "holds single addresses"),
        ({"members": ["fd00::1"]}, "not an IPv4 address"),
        ({"family": "inet6", "members": ["10.0.0.1"]}, "not an IPv6 address"),
        ({"members": ["10.0.0.x"]}, "not an IP address"),
        ({"type": "hash:net", "members": ["10.0.0.1/24"]}, "write the network as 10.0.0.0/24"),
        ({"type": "hash:net", "members": ["0.0.0.0/0"]}, "/0"),
        ({"type": "hash:ip,port", "members": ["10.0.0.1"]}, "2 comma-separated"),
        ({"members": ["10.0.0.1", "10.0.0.1"]}, "listed twice"),
        ({"members": ["10.0.0.1 10.0.0.2"]}, "without spaces"),
        ({"name": "x" * 32}, "1..31"),
        ({"name": "bad name"}, "invalid"),
        ({"options": {"comment": 'a"b'}}, "without quotes"),
        ({"options": {"maxelem": 0}}, "positive"),
        ({"options": {"color": 1}}, "unknown ipset option"),
    ],
)
def test_validation(kw, message) -> None:
    with pytest.raises(ips.IpsetError, match=message):
        spec(**kw)


def test_valid_members_of_several_types() -> None:
    spec(members=["10.0.0.1", "10.0.0.2"])
    spec(type="hash:net", members=["10.0.0.0/24", "10.1.0.1"])
    spec(type="hash:ip,port", members=["10.0.0.1,tcp:80", "10.0.0.1,53"])
    spec(family="inet6", members=["fd00::1"])


def test_create_and_add_lines() -> None:
    s = spec(options={"hashsize": 64, "maxelem": 10, "timeout": 5, "comment": "ztmesh"})
    assert (
        ips.create_line(s, "s1-ztmp")
        == "create s1-ztmp hash:ip family inet hashsize 64 maxelem 10 timeout 5 comment"
    )
    assert ips.add_line("s1", "10.0.0.1", "ztmesh") == 'add s1 10.0.0.1 comment "ztmesh"'


def test_temp_name_fits_31_chars_and_avoids_existing_sets() -> None:
    name = "n" * 31
    first = ips.pick_temp_name(name, [])
    assert len(first) <= 31 and first.endswith("-ztmp")
    second = ips.pick_temp_name(name, [first])
    assert second != first and len(second) <= 31


def _state(name, members, type_="hash:ip", **header):
    base = {"family": "inet", "hashsize": "1024", "maxelem": "65536"}
    base.update(header)
    return ips.SetState(name, type_, base, dict.fromkeys(members))


def test_plan_create_fills_a_temporary_set_and_renames_it() -> None:
    s = spec(members=["10.0.0.1"])
    plan = ips.plan_present(s, "exact", None, _state("s1", ["10.0.0.1"]), "s1-ztmp", 0)
    assert plan.lines == ["create s1-ztmp hash:ip family inet", "add s1-ztmp 10.0.0.1", "rename s1-ztmp s1"]
    assert plan.added == ["10.0.0.1"] and plan.removed == []


def test_plan_exact_swaps_and_reports_added_and_removed() -> None:
    s = spec(members=["10.0.0.1", "10.0.0.3"])
    plan = ips.plan_present(
        s,
        "exact",
        _state("s1", ["10.0.0.1", "10.0.0.2"]),
        _state("s1", ["10.0.0.1", "10.0.0.3"]),
        "s1-ztmp",
        2,
    )
    assert plan.lines[-2:] == ["swap s1 s1-ztmp", "destroy s1-ztmp"]
    assert plan.added == ["10.0.0.3"] and plan.removed == ["10.0.0.2"]


def test_plan_exact_is_empty_when_equal_even_if_the_kernel_grew_the_hash() -> None:
    s = spec(members=["10.0.0.1"], options={"hashsize": 1024})
    live = _state("s1", ["10.0.0.1"], hashsize="4096")
    plan = ips.plan_present(s, "exact", live, _state("s1", ["10.0.0.1"]), "s1-ztmp", 0)
    assert plan.lines == []


def test_plan_merge_only_adds() -> None:
    s = spec(members=["10.0.0.3"])
    plan = ips.plan_present(s, "merge", _state("s1", ["10.0.0.1"]), _state("s1", ["10.0.0.3"]), "t", 0)
    assert plan.lines == ["add s1 10.0.0.3"] and plan.removed == []
    assert set(plan.after.members) == {"10.0.0.1", "10.0.0.3"}


def test_plan_option_change_rebuilds_with_swap() -> None:
    s = spec(members=["10.0.0.1"], options={"maxelem": 10})
    plan = ips.plan_present(
        s, "exact", _state("s1", ["10.0.0.1"]), _state("s1", ["10.0.0.1"], maxelem="10"), "s1-ztmp", 3
    )
    assert plan.lines[0] == "create s1-ztmp hash:ip family inet maxelem 10"
    assert "swap s1 s1-ztmp" in plan.lines


def test_plan_type_change_of_an_unused_set_recreates_it() -> None:
    s = spec(type="hash:net", members=["10.0.0.0/24"])
    plan = ips.plan_present(
        s, "exact", _state("s1", ["10.0.0.1"]), _state("s1", ["10.0.0.0/24"], type_="hash:net"), "s1-ztmp", 0
    )
    assert plan.lines[-2:] == ["destroy s1", "rename s1-ztmp s1"]


def test_plan_type_change_of_a_referenced_set_is_refused_with_advice() -> None:
    s = spec(type="hash:net", members=["10.0.0.0/24"])
    with pytest.raises(ips.IpsetError, match="in use by 1 kernel object.*ztmesh_iptables state=absent"):
        ips.plan_present(
            s,
            "exact",
            _state("s1", ["10.0.0.1"]),
            _state("s1", ["10.0.0.0/24"], type_="hash:net"),
            "s1-ztmp",
            1,
        )


def test_restore_error_names_the_input_line() -> None:
    msg = ips.restore_error(
        "ipset v7.17: Error in line 2: Syntax error: bad\n", ["create a hash:ip", "add a x"]
    )
    assert "add a x" in msg
