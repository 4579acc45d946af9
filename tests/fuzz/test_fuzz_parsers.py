"""The mesh state and settings parsers against generated documents: arbitrary bytes, and YAML built
from the parsers' own keys with values of every type (the inputs most likely to reach deep code).

Each parser must either accept the input or refuse it with its own error (MeshStateError, ConfigError)
naming what is wrong: never another exception. A valid state must still load afterwards."""

from __future__ import annotations

import yaml
from conftest import Replay, rss_bytes
from hypothesis import given
from hypothesis import strategies as st

from ztproxy import meshseal
from ztproxy.config import ConfigError, settings_from_dict
from ztproxy.identity.meshstate import parse_placements
from ztproxy.state import (
    _ENDPOINT_KEYS,
    _SERVICE_KEYS,
    _WORKLOAD_KEYS,
    MeshStateError,
    parse_mesh_state_bytes,
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["10.0.0.1", "/10.96.0.1", "HBONE", "TCP",
                                                           "Healthy", "ns/h.svc", "a", "0x539", "15008",
                                                           "127.0.0.1:0", "[::1]:53", "ALLOW", "Deny"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(st.text(max_size=8),
                                                                                 st.integers(0, 99)),
                                                                       inner, max_size=4)),
                      max_leaves=12)


def entry(keys):
    return st.dictionaries(st.sampled_from(sorted(keys)), values, max_size=len(keys))


policy_keys = ["name", "namespace", "scope", "action", "rules", "dryRun", "groups"]
documents = st.fixed_dictionaries({}, optional={
    "workloads": st.lists(entry(_WORKLOAD_KEYS), max_size=4),
    "services": st.lists(st.one_of(entry(_SERVICE_KEYS),
                                   st.builds(lambda s, e: dict(s, endpoints=e), entry(_SERVICE_KEYS),
                                             st.dictionaries(st.text(max_size=6), entry(_ENDPOINT_KEYS),
                                                             max_size=2))), max_size=3),
    "policies": st.lists(entry(policy_keys), max_size=3),
})


def _parse_state(raw: bytes) -> None:
    try:
        parse_mesh_state_bytes(raw, "cluster.local")
    except MeshStateError as exc:
        assert str(exc)
    try:
        parse_placements(raw.decode("utf-8", "replace"), "cluster.local")
    except MeshStateError as exc:
        assert str(exc)


# The inputs of the runs below, replayed without Hypothesis by the memory test (conftest.Replay).
STATE_INPUTS, SETTINGS_INPUTS = Replay(limit=20000), Replay(limit=20000)


@given(raw=st.binary(max_size=400))
def test_mesh_state_from_arbitrary_bytes(raw: bytes) -> None:
    STATE_INPUTS.add(raw)
    _parse_state(raw)


@given(document=documents, sealed=st.booleans(), cut=st.integers(0, 10**6))
def test_mesh_state_from_generated_documents(document, sealed: bool, cut: int) -> None:
    text = yaml.safe_dump(document, sort_keys=True)
    raw = (meshseal.seal(text) if sealed else text).encode()
    for piece in (raw, raw[:cut % (len(raw) + 1)]):
        STATE_INPUTS.add(piece)
        _parse_state(piece)


settings_keys = {
    "node_name": values, "trust_domain": values, "mesh_state": values, "hbone_port": values,
    "socket_mark": values, "connect_timeout": values, "pool_max_streams": values, "log_level": values,
    "max_frame_size": values, "stream_window": values, "reload_interval": values,
    "listen": st.dictionaries(st.sampled_from(["outbound", "inbound", "inbound_plaintext", "transparent",
                                               "dns", "admin", "metrics", "readiness", "bogus"]), values),
    "dns": st.dictionaries(st.sampled_from(["upstreams", "resolv_conf", "search_domains", "domain"]), values),
    "ca": st.dictionaries(st.sampled_from(["addresses", "identity", "cert_ttl", "renew_fraction"]), values),
    "revocation": st.dictionaries(st.sampled_from(["deny_list", "crls"]), values),
    "access_log": values,
}


@given(data=st.one_of(values, st.fixed_dictionaries({}, optional=settings_keys)))
def test_settings_from_generated_documents(data) -> None:
    SETTINGS_INPUTS.add(data)
    _parse_settings(data)


def _parse_settings(data) -> None:
    try:
        settings_from_dict(data)
    except ConfigError as exc:
        assert str(exc)


def test_parsers_still_work_and_memory_is_bounded() -> None:
    assert STATE_INPUTS.inputs and SETTINGS_INPUTS.inputs, "runs after the fuzz tests above"
    before = rss_bytes()
    for replay, feed in ((STATE_INPUTS, _parse_state), (SETTINGS_INPUTS, _parse_settings)):
        grown, replayed = replay.growth(feed)
        assert grown < 100 * 2**20, f"{feed.__name__}: memory grew by {grown / 2**20:.0f} MiB over {replayed}"
    good = meshseal.seal("workloads:\n- {name: a, namespace: x, workloadIps: [10.0.0.1], node: n1}\n")
    assert len(parse_mesh_state_bytes(good.encode(), "cluster.local").workloads) == 1
    assert settings_from_dict({"node_name": "n1"}).node_name == "n1"
    assert rss_bytes() - before < 100 * 2**20
