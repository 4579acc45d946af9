"""ztproxy settings (ztproxy/config.py): one settings file for every key of ``ztproxy run`` (data plane,
listeners, DNS, access log, CA renewal, revocation). Defaults in one place, every bad value named with
what is expected, and the reference in docs/ztproxy.md lists every key with its real default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ztproxy import config
from ztproxy.config import (
    _SECTIONS,
    _TOP_KEYS,
    ConfigError,
    Settings,
    load_settings,
    settings_from_dict,
    settings_to_dict,
)


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


# ----------------------------------------------------------------- the reference and the dump

DOC = Path(__file__).resolve().parents[2] / "docs" / "ztproxy.md"


def documented_settings() -> dict:
    """The YAML block of the "Settings file" section of docs/ztproxy.md."""
    text = DOC.read_text()
    section = text[text.index("## Settings file"):text.index("## Mesh state")]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return yaml.safe_load(block)


def test_the_reference_lists_every_key_with_its_real_default() -> None:
    documented = documented_settings()
    assert set(documented) == set(_TOP_KEYS) | set(_SECTIONS)
    for name, (_, checkers) in _SECTIONS.items():
        assert set(documented[name]) == set(checkers), name
    # parsed, the documented file is exactly the defaults (only node_name is required)
    assert settings_from_dict(documented) == settings_from_dict({"node_name": documented["node_name"]})


def test_the_settings_dump_is_itself_a_valid_settings_file() -> None:
    settings = settings_from_dict({
        "node_name": "vm-1",
        "listen": {"admin": "[::1]:15000", "dns": None, "outbound": "10.0.0.1:0"},
        "dns": {"upstreams": ["192.0.2.53", "[2001:db8::53]:5353"], "search_domains": ["corp.example"]},
        "access_log": {"format": "json"},
        "ca": {"addresses": ["istiod.istio-system.svc", "10.0.0.5:15012"],
               "server_name": "istiod.istio-system.svc", "token_file": "/var/run/ztproxy/token",
               "cert_ttl": 3600, "renew_fraction": 0.6},
        "revocation": {"deny_list": "/etc/ztproxy/deny-list.yaml", "crls": ["/etc/ztproxy/ca.crl"]},
    })
    dumped = settings_to_dict(settings)
    assert dumped["listen"]["admin"] == "[::1]:15000"
    assert dumped["ca"]["addresses"][0] == "istiod.istio-system.svc:15012"
    assert settings_from_dict(yaml.safe_load(yaml.safe_dump(dumped))) == settings
    assert settings.ca.addresses == (("istiod.istio-system.svc", 15012), ("10.0.0.5", 15012))
    assert settings.revocation.enabled and not Settings(node_name="x").revocation.enabled


@pytest.mark.parametrize("data, words", [
    ({"listen": {"metrics": "0.0.0.0:15000"}}, ["'listen.metrics'", "collides with 'listen.admin'"]),
    ({"listen": {"dns": "[::]:15008"}}, ["'listen.dns'", "'listen.inbound'"]),
    ({"dns": {"upstreams": ["127.0.0.1:15053"]}}, ["dns.upstreams[0]", "DNS proxy's own address"]),
    ({"dns": {"domain": "cluster local"}}, ["'dns.domain'", "a DNS name"]),
    ({"ca": {"addresses": ["10.0.0.5:0"]}}, ["'ca.addresses[0]'", "HOST:PORT"]),
    ({"ca": {"identity": "cluster.local/ns/x/sa/y"}}, ["'ca.identity'", "spiffe://"]),
    ({"ca": {"renew_fraction": 1}}, ["'ca.renew_fraction'", "from 0.1 to 0.9"]),
    ({"ca": {"token_file": "token"}}, ["'ca.token_file'", "absolute path"]),
    ({"ca": {"adresses": []}}, ["'ca.adresses' is unknown", "ca.addresses"]),
    ({"revocation": {"crls": ["relative.crl"]}}, ["'revocation.crls[0]'", "absolute path"]),
    ({"revocation": []}, ["'revocation'", "a mapping with the keys deny_list, crls"]),
    ({"services": {"admin": "127.0.0.1:15000"}}, ["'services' is unknown", "listen"]),
])
def test_bad_values_name_the_key_and_what_to_write(data, words) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(dict(node_name="n", **data))
    for word in words:
        assert word in str(err.value)


def test_port_zero_listeners_never_collide() -> None:
    listen = {name: "127.0.0.1:0" for name in ("outbound", "inbound", "inbound_plaintext", "dns", "admin",
                                                "metrics", "readiness")}
    assert settings_from_dict({"node_name": "n", "listen": listen}).listen.admin == ("127.0.0.1", 0)


# ----------------------------------------------------------------- the services beside the data plane
# (DNS, admin, metrics, readiness, access log): sections of the same settings file

def test_defaults_are_ztunnels_ports():
    settings = settings_from_dict({"node_name": "n"})
    assert settings.listen.admin == ("127.0.0.1", 15000)
    assert settings.listen.metrics == ("127.0.0.1", 15020)  # loopback: issue 13, off-node exposure
    assert settings.listen.readiness == ("127.0.0.1", 15021)
    assert settings.listen.dns == ("0.0.0.0", 15053)
    assert settings.dns.upstreams == () and settings.dns.search_domains is None
    assert settings.dns.resolv_conf == "/etc/resolv.conf" and settings.dns.domain == "cluster.local"
    assert settings.access_log.format is None and settings.access_log.log_open is False


def test_values_are_parsed():
    settings = settings_from_dict({
        "node_name": "n",
        "listen": {"admin": "[::1]:15000", "dns": None},
        "dns": {"upstreams": ["192.0.2.53", "[2001:db8::53]:5353"], "search_domains": ["corp.example"]},
        "access_log": {"format": "json", "log_open": True},
    })
    assert settings.listen.admin == ("::1", 15000) and settings.listen.dns is None
    assert settings.dns.upstreams == (("192.0.2.53", 53), ("2001:db8::53", 5353))
    assert settings.dns.search_domains == ("corp.example",)
    assert settings.access_log.format == "json" and settings.access_log.log_open


@pytest.mark.parametrize("data,message", [
    ({"listen": {"admin": "localhost:15000"}}, "'listen.admin': 'localhost:15000' is not valid: expected"),
    ({"dns": {"upstreams": "192.0.2.53"}}, "'dns.upstreams': '192.0.2.53' is not valid: expected a list"),
    ({"dns": {"upstreams": ["dns.example"]}}, "'dns.upstreams\\[0\\]': 'dns.example' is not valid"),
    ({"access_log": {"format": "xml"}}, "'access_log.format': 'xml' is not valid: expected one of text"),
    ({"access_log": {"log_open": "yes"}}, "expected true or false"),
    ({"dns": {"search_domains": "corp.example"}}, "'dns.search_domains'.*expected a list of domains"),
    ({"metrics_port": 15020}, "settings key 'metrics_port' is unknown"),
    ({"dns": {"upstream": []}}, "settings key 'dns.upstream' is unknown; known keys: dns.domain"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_dict(dict(node_name="n", **data))
