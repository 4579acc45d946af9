"""Settings of the services beside the data plane (DNS, admin, metrics, readiness, access log): since the
settings were folded into ztproxy.config, these are sections of the one settings file."""

from __future__ import annotations

import pytest

from ztproxy.config import ConfigError, settings_from_dict


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
