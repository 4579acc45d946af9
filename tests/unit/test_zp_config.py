"""ztproxy settings: defaults in one place, every bad value named with what is expected."""

from __future__ import annotations

import pytest

from ztproxy import config
from ztproxy.config import ConfigError, load_settings, settings_from_dict


def test_defaults_are_ztunnels() -> None:
    settings = settings_from_dict({"node_name": "node-a"})
    assert settings.listen.outbound == ("0.0.0.0", 15001)
    assert settings.listen.inbound == ("0.0.0.0", 15008)
    assert settings.listen.inbound_plaintext == ("0.0.0.0", 15006)
    assert settings.hbone_port == 15008
    assert settings.pool_max_streams == 100
    assert settings.pool_idle_timeout == 300.0
    assert settings.drain_timeout == 5.0
    assert settings.trust_domain == "cluster.local"
    assert settings.socket_mark == 0x539
    assert settings.max_frame_size == config.DEFAULT_MAX_FRAME_SIZE == 64 << 10  # issue 13: not 1 MiB


def test_full_settings_parse() -> None:
    settings = settings_from_dict({
        "node_name": "vm-1", "trust_domain": "example.org", "mesh_state": "/etc/ztmesh/state.yaml",
        "listen": {"outbound": "[::]:15001", "inbound_plaintext": None, "transparent": False},
        "pool_idle_timeout": 30, "log_format": "JSON", "log_level": "debug",
    })
    assert settings.listen.outbound == ("::", 15001)
    assert settings.listen.inbound_plaintext is None
    assert settings.listen.transparent is False
    assert settings.pool_idle_timeout == 30.0
    assert settings.log_format == "json"


@pytest.mark.parametrize("data, words", [
    ({}, ["'node_name' is required"]),
    ({"node_name": "n", "listen": {"outbound": "0.0.0.0:99999"}}, ["listen.outbound", "99999", "IP:PORT"]),
    ({"node_name": "n", "listen": {"inbound": "localhost:15008"}}, ["listen.inbound", "localhost:15008"]),
    ({"node_name": "n", "pool_max_streams": 0}, ["pool_max_streams", "0", "from 1 to 1000"]),
    ({"node_name": "n", "drain_timeout": "5s"}, ["drain_timeout", "'5s'", "number of seconds"]),
    ({"node_name": "n", "trust_domain": "Cluster.Local/x"}, ["trust_domain", "SPIFFE trust domain"]),
    ({"node_name": "n", "certs_dir": "relative/dir"}, ["certs_dir", "absolute path"]),
    ({"node_name": "n", "log_format": "xml"}, ["log_format", "'xml'", "text, json"]),
    ({"node_name": "n", "max_frame_size": 1024}, ["max_frame_size", "1024", "16384"]),
    ({"node_name": "n", "stream_window": 1 << 25}, ["stream_window", "connection_window"]),
    ({"node_name": "n", "listen_adress": "x"}, ["listen_adress", "unknown", "known keys"]),
    ({"node_name": "n", "listen": {"outbond": "x"}}, ["listen.outbond", "unknown"]),
    (["node_name"], ["YAML mapping"]),
])
def test_bad_values_are_named(data, words) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data)
    for word in words:
        assert word in str(err.value)


def test_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read settings file .*missing.yaml"):
        load_settings(str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_settings(str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("node_name: n\nhbone_port: 0\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: settings key 'hbone_port': 0"):
        load_settings(str(wrong))


def test_limits_against_hostile_peers_have_defaults_and_checked_values() -> None:
    """Issue 13: each limit is a setting with a stated default and a clear error for a bad value."""
    settings = settings_from_dict({"node_name": "node-a"})
    assert (settings.max_header_list_size, settings.header_timeout, settings.preface_timeout,
            settings.idle_timeout, settings.max_connections_per_peer, settings.max_stream_resets,
            settings.connection_write_buffer, settings.max_plaintext_connections_per_peer) == (
                16384, 10.0, 10.0, 600.0, 256, 200, 1 << 20, 256)
    tuned = settings_from_dict({"node_name": "node-a", "max_header_list_size": 4096, "header_timeout": 2,
                                "preface_timeout": 3, "idle_timeout": 60, "max_connections_per_peer": 10,
                                "max_stream_resets": 50, "connection_write_buffer": 65536})
    assert (tuned.max_header_list_size, tuned.preface_timeout, tuned.max_stream_resets) == (4096, 3.0, 50)
    for key, bad, expected in (("max_header_list_size", 100, "an integer from 1024 to 1048576"),
                               ("header_timeout", 0, "a number of seconds from 0.1 to 300"),
                               ("preface_timeout", "10s", "a number of seconds from 0.1 to 300"),
                               ("idle_timeout", 0.5, "a number of seconds from 1 to 86400"),
                               ("max_connections_per_peer", 0, "an integer from 1 to 100000"),
                               ("max_plaintext_connections_per_peer", 0, "an integer from 1 to 100000"),
                               ("max_stream_resets", True, "an integer from 1 to 100000"),
                               ("connection_write_buffer", 1024, "an integer from 16384 to 67108864")):
        with pytest.raises(ConfigError) as err:
            settings_from_dict({"node_name": "node-a", key: bad})
        assert str(err.value) == f"settings key '{key}': {bad!r} is not valid: expected {expected}"
