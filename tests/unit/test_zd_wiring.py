"""Settings of the services beside the data plane (DNS, admin, metrics, readiness, access log)."""

from __future__ import annotations

import pytest

from ztproxy.wiring import NodeServices, NodeServicesError


def test_defaults_are_ztunnels_ports():
    services = NodeServices.from_dict(None)
    assert services.admin == ("127.0.0.1", 15000)
    assert services.metrics == ("0.0.0.0", 15020)
    assert services.readiness == ("0.0.0.0", 15021)
    assert services.dns == ("0.0.0.0", 15053)
    assert services.dns_upstreams == () and services.dns_search_domains is None


def test_values_are_parsed():
    services = NodeServices.from_dict({
        "admin": "[::1]:15000", "dns": None, "dns_upstreams": ["192.0.2.53", "[2001:db8::53]:5353"],
        "dns_search_domains": ["corp.example"], "access_log_format": "json", "access_log_open": True,
    })
    assert services.admin == ("::1", 15000) and services.dns is None
    assert services.dns_upstreams == (("192.0.2.53", 53), ("2001:db8::53", 5353))
    assert services.dns_search_domains == ("corp.example",)
    assert services.access_log_format == "json" and services.access_log_open


@pytest.mark.parametrize("data,message", [
    ({"admin": "localhost:15000"}, "'admin': 'localhost:15000' is not 'IP:PORT'"),
    ({"dns_upstreams": "192.0.2.53"}, "'dns_upstreams': expected a list"),
    ({"dns_upstreams": ["dns.example"]}, "'dns_upstreams': DNS upstream 'dns.example'"),
    ({"access_log_format": "xml"}, "not one of text, json"),
    ({"access_log_open": "yes"}, "expected true or false"),
    ({"dns_search_domains": "corp.example"}, "expected a list of domains"),
    ({"metrics_port": 15020}, "unknown key\\(s\\) metrics_port"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(NodeServicesError, match=message):
        NodeServices.from_dict(data)
