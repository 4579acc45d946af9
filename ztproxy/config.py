"""Proxy settings: every setting of ``ztproxy run`` and its default live in this module (as ztunnel keeps
them in config.rs): the data plane, the DNS proxy, the admin/metrics/readiness servers, the access log,
online certificate renewal and revocation.

The settings file is YAML: flat keys for the data plane, plus the sections ``listen`` (every address
ztproxy binds), ``dns``, ``access_log``, ``ca`` and ``revocation``. Each key is validated; an error names
the key, the bad value and what is expected, so an operator can fix the file without reading code.
Unknown keys are errors. See docs/ztproxy.md for the reference.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Type

import yaml

from ztproxy.identity.pki import (
    DEFAULT_CA_PORT,
    DEFAULT_CERT_TTL,
    DEFAULT_RENEW_FRACTION,
    DEFAULT_TRUST_DOMAIN,
    MAX_CERT_TTL,
    IdentityError,
    SpiffeId,
    check_trust_domain,
)

# The ports ztunnel uses, kept so the node rules of both agree (docs/ztproxy.md, "Ports").
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
DNS_PORT = 15053
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021

DEFAULT_MESH_STATE = "/etc/ztproxy/mesh-state.yaml"
DEFAULT_CERTS_DIR = "/var/lib/ztproxy/certs"
DEFAULT_TRUST_BUNDLE = "/var/lib/ztproxy/certs/root-cert.pem"

# ztunnel marks the sockets it opens with 1337 so the node's rules never capture them again.
DEFAULT_SOCKET_MARK = 0x539
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
# An endpoint whose connect failed is skipped by service load balancing for this long.
DEFAULT_ENDPOINT_FAILURE_COOLDOWN = 30.0
# ztunnel: POOL_MAX_STREAMS_PER_CONNECTION = 100, pool idle timeout 5 minutes.
DEFAULT_POOL_MAX_STREAMS = 100
DEFAULT_POOL_IDLE_TIMEOUT = 300.0
# HTTP/2 sizes as ztunnel sets them: 1 MiB frames, 4 MiB per stream, 16 MiB per connection. The windows
# bound how much one stream / one connection may buffer in the proxy.
# The frame size advertised is what a peer may make the proxy buffer before a frame can be parsed:
# 64 KiB per connection (issue 13: 1 MiB frames let CONTINUATION floods hold 63 MiB per connection).
DEFAULT_MAX_FRAME_SIZE = 64 << 10
DEFAULT_STREAM_WINDOW = 4 << 20
DEFAULT_CONNECTION_WINDOW = 16 << 20
# Hostile peers (docs/ztproxy.md, Security, "HTTP/2 and connection limits"). A HBONE request is a few
# hundred bytes of headers: 16 KiB is nginx's and Envoy's order of magnitude, far above any CONNECT.
DEFAULT_MAX_HEADER_LIST_SIZE = 16 << 10
# A header block (HEADERS + CONTINUATION) must be complete within this time (slow-loris headers).
DEFAULT_HEADER_TIMEOUT = 10.0
# A TLS connection must send the HTTP/2 preface and SETTINGS within this time (ztunnel/hyper: 10 s).
DEFAULT_PREFACE_TIMEOUT = 10.0
# An inbound HBONE connection without a stream for this long is closed (GOAWAY). Longer than the
# clients' pool_idle_timeout, so a healthy peer closes its idle connections first.
DEFAULT_IDLE_TIMEOUT = 600.0
# Inbound HBONE connections (TLS handshakes included) from one source address at once. A busy peer
# needs one per (source identity, destination identity) per 100 streams.
DEFAULT_MAX_CONNECTIONS_PER_PEER = 256
# Inbound plaintext connections (port 15006, clients outside the mesh) from one source address at once.
# Each holds two file descriptors (the client's socket and the upstream one) and a relay: without a cap
# one address could use up the proxy's file descriptors and starve every other client.
DEFAULT_MAX_PLAINTEXT_CONNECTIONS_PER_PEER = 256
# Streams the peer may reset per connection within STREAM_RESET_WINDOW seconds before the connection
# is closed with GOAWAY ENHANCE_YOUR_CALM (CVE-2023-44487, as nginx, h2o and Go bound it).
DEFAULT_MAX_STREAM_RESETS = 200
STREAM_RESET_WINDOW = 10.0
# Bytes the TLS connection may hold unsent before the streams stop reading their TCP sockets.
DEFAULT_CONNECTION_WRITE_BUFFER = 1 << 20
DEFAULT_DRAIN_TIMEOUT = 5.0
# How often the mesh state and certificate files are checked for changes.
DEFAULT_RELOAD_INTERVAL = 1.0
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "text"

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

# DNS proxy. The upstreams come from the node's ORIGINAL resolv.conf (ztmesh never rewrites it).
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_DNS_DOMAIN = "cluster.local"
DNS_UPSTREAM_PORT = 53

# Access log: None sends the lines through the proxy's own log handler and format.
ACCESS_LOG_FORMATS = ("text", "json")

Address = Tuple[str, int]


class ConfigError(Exception):
    """A settings file that cannot be used; the message says which key and what to write instead."""


@dataclass(frozen=True)
class ListenSettings:
    """Every address ztproxy listens on; None disables that listener or server."""

    outbound: Optional[Address] = ("0.0.0.0", OUTBOUND_PORT)
    inbound: Optional[Address] = ("0.0.0.0", HBONE_PORT)
    inbound_plaintext: Optional[Address] = ("0.0.0.0", INBOUND_PLAINTEXT_PORT)
    # IP_TRANSPARENT on the data-plane listeners: needed for TPROXY capture (needs CAP_NET_ADMIN).
    transparent: bool = True
    dns: Optional[Address] = ("0.0.0.0", DNS_PORT)  # UDP and TCP
    # The admin server can stop the proxy (/quitquitquit): loopback only, as ztunnel.
    admin: Optional[Address] = ("127.0.0.1", ADMIN_PORT)
    # Loopback by default: the proxy's addresses are routable through the node, so 0.0.0.0 made both
    # reachable from off the node (issue 13). Set "0.0.0.0:15020" to let a remote scraper in.
    metrics: Optional[Address] = ("127.0.0.1", METRICS_PORT)
    readiness: Optional[Address] = ("127.0.0.1", READINESS_PORT)


@dataclass(frozen=True)
class DnsSettings:
    # Empty: the nameservers of resolv_conf (systemd-resolved's list when it names only its stub).
    upstreams: Tuple[Address, ...] = ()
    resolv_conf: str = DEFAULT_RESOLV_CONF  # the node's ORIGINAL resolv.conf
    search_domains: Optional[Tuple[str, ...]] = None  # None: the resolv.conf 'search' line
    domain: str = DEFAULT_DNS_DOMAIN  # mesh names are <name>.<namespace>.svc.<domain>


@dataclass(frozen=True)
class AccessLogSettings:
    format: Optional[str] = None  # None: through the proxy's log handler; text/json: own handler (stderr)
    log_open: bool = False  # also a line when a connection opens, not only when it ends


@dataclass(frozen=True)
class CaSettings:
    """Online renewal from the mesh CA (docs/identity.md). No address: certificates are renewed by Ansible
    (ztmesh_cert) only."""

    addresses: Tuple[Address, ...] = ()  # host:port of signing services (or istiod), tried in random order
    # How the CA's server certificate is recognised: its SPIFFE ID (default: ztmesh's signing service,
    # spiffe://<trust_domain>/ns/ztmesh-system/sa/ztmesh-ca), or a DNS name (istiod.istio-system.svc).
    identity: Optional[str] = None
    server_name: Optional[str] = None
    token_file: Optional[str] = None  # bearer token sent to the CA (istiod authenticates with one)
    cert_ttl: int = DEFAULT_CERT_TTL  # lifetime asked for, seconds
    renew_fraction: float = DEFAULT_RENEW_FRACTION  # renew when this part of the lifetime has passed


@dataclass(frozen=True)
class RevocationSettings:
    """Certificates refused at every HBONE handshake before they expire (docs/identity.md). CRLs must be
    signed by a CA certificate of the trust bundle."""

    deny_list: Optional[str] = None  # YAML: serials, spiffeIds, nodes; a missing file denies nothing
    crls: Tuple[str, ...] = ()  # CRL files, PEM or DER

    @property
    def enabled(self) -> bool:
        return self.deny_list is not None or bool(self.crls)


@dataclass(frozen=True)
class Settings:
    node_name: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    mesh_state: str = DEFAULT_MESH_STATE
    certs_dir: str = DEFAULT_CERTS_DIR
    trust_bundle: str = DEFAULT_TRUST_BUNDLE
    listen: ListenSettings = field(default_factory=ListenSettings)
    hbone_port: int = HBONE_PORT
    # Bind the upstream socket to the client's address (IP_TRANSPARENT) so the target sees the real
    # client; needs the node's return-path rules (docs/dataplane.md, the proxy namespace's rule sets).
    preserve_source: bool = True
    socket_mark: int = DEFAULT_SOCKET_MARK
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    endpoint_failure_cooldown: float = DEFAULT_ENDPOINT_FAILURE_COOLDOWN
    pool_max_streams: int = DEFAULT_POOL_MAX_STREAMS
    pool_idle_timeout: float = DEFAULT_POOL_IDLE_TIMEOUT
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    preface_timeout: float = DEFAULT_PREFACE_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    max_plaintext_connections_per_peer: int = DEFAULT_MAX_PLAINTEXT_CONNECTIONS_PER_PEER
    max_stream_resets: int = DEFAULT_MAX_STREAM_RESETS
    connection_write_buffer: int = DEFAULT_CONNECTION_WRITE_BUFFER
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    reload_interval: float = DEFAULT_RELOAD_INTERVAL
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = DEFAULT_LOG_FORMAT
    dns: DnsSettings = field(default_factory=DnsSettings)
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    ca: CaSettings = field(default_factory=CaSettings)
    revocation: RevocationSettings = field(default_factory=RevocationSettings)

    def identity_dir(self, namespace: str, service_account: str) -> str:
        return os.path.join(self.certs_dir, namespace, service_account)


# ---------------------------------------------------------------------------------------------------
# Validation: one small checker per value kind. Each returns the parsed value or raises ConfigError.

Checker = Callable[[str, Any], Any]


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"settings key '{key}': {value!r} is not valid: expected {expected}")


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, value, "a non-empty string")
    return value


def _path(key: str, value: Any) -> str:
    value = _string(key, value)
    if not os.path.isabs(value):
        raise _fail(key, value, "an absolute path")
    return value


def _trust_domain(key: str, value: Any) -> str:
    value = _string(key, value)
    try:
        return check_trust_domain(value)
    except IdentityError:
        raise _fail(key, value, "a SPIFFE trust domain such as 'cluster.local' (lowercase letters, digits, "
                                "'.', '-' and '_')") from None


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _int_range(low: int, high: int) -> Checker:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail(key, value, f"an integer from {low} to {high}")
        return value

    return check


def _seconds(low: float, high: float) -> Checker:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise _fail(key, value, f"a number of seconds from {low:g} to {high:g}")
        return float(value)

    return check


def _choice(*choices: str) -> Checker:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _fail(key, value, "one of " + ", ".join(choices))
        return value.lower()

    return check


def _optional(checker: Checker) -> Checker:
    """``checker``, or null (None) for "not set"."""

    def check(key: str, value: Any) -> Any:
        return None if value is None else checker(key, value)

    return check


def _fraction(low: float, high: float) -> Checker:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise _fail(key, value, f"a number from {low:g} to {high:g}")
        return float(value)

    return check


def _list_of(item: Checker, expected: str) -> Checker:
    """A YAML list whose items ``item`` checks; the error names the item (``key[2]``)."""

    def check(key: str, value: Any) -> tuple:
        if not isinstance(value, list):
            raise _fail(key, value, f"a list of {expected}")
        return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(value))

    return check


def _listen_address(key: str, value: Any) -> Optional[Address]:
    """'HOST:PORT' (IPv6 as '[::]:PORT'); null disables the listener."""
    if value is None:
        return None
    expected = "'IP:PORT' (IPv6 as '[IP]:PORT') with port 0-65535, or null to disable the listener"
    if not isinstance(value, str):
        raise _fail(key, value, expected)
    try:
        return parse_host_port(value, allow_zero=True)
    except ValueError:
        raise _fail(key, value, expected) from None


def _dns_upstream(key: str, value: Any) -> Address:
    """'IP', 'IP:PORT', '[IPv6]' or '[IPv6]:PORT' (port 53 when omitted)."""
    expected = "a nameserver 'IP' or 'IP:PORT' (IPv6 as '[IP]:PORT'), port 53 when omitted"
    if not isinstance(value, str):
        raise _fail(key, value, expected)
    text = value.strip()
    try:
        if text.startswith("[") and text.endswith("]"):
            text = f"{text}:{DNS_UPSTREAM_PORT}"
        elif not text.startswith("[") and text.count(":") != 1:
            text = f"[{text}]:{DNS_UPSTREAM_PORT}" if ":" in text else f"{text}:{DNS_UPSTREAM_PORT}"
        return parse_host_port(text)
    except ValueError:
        raise _fail(key, value, expected) from None


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _dns_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _HOSTNAME.match(value):
        raise _fail(key, value, "a DNS name such as 'cluster.local'")
    return value.rstrip(".")


def _ca_address(key: str, value: Any) -> Address:
    """'HOST:PORT' with HOST an IP or a DNS name (istiod.istio-system.svc); port 15012 when omitted."""
    expected = f"'HOST:PORT' (IPv6 as '[IP]:PORT'; port {DEFAULT_CA_PORT} when omitted)"
    if not isinstance(value, str):
        raise _fail(key, value, expected)
    text = value.strip()
    bare_host = ":" not in text if not text.startswith("[") else text.endswith("]")
    if bare_host:
        text = f"{text}:{DEFAULT_CA_PORT}"
    try:
        return parse_host_port(text)
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and 1 <= int(port) <= 65535 and _HOSTNAME.match(host):
        return host, int(port)
    raise _fail(key, value, expected)


def _spiffe_id(key: str, value: Any) -> str:
    expected = "a SPIFFE ID spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    try:
        SpiffeId.parse(value)
    except IdentityError:
        raise _fail(key, value, expected) from None
    return value


def parse_host_port(text: str, allow_zero: bool = False) -> Tuple[str, int]:
    """Parse 'ip:port' or '[ipv6]:port' into (ip, port); raises ValueError."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(text)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(text)
    ip = ipaddress.ip_address(host)
    if not port_text.isdigit():
        raise ValueError(text)
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(text)
    return str(ip), port


_TOP_KEYS: Dict[str, Checker] = {
    "node_name": _string,
    "trust_domain": _trust_domain,
    "mesh_state": _path,
    "certs_dir": _path,
    "trust_bundle": _path,
    "hbone_port": _int_range(1, 65535),
    "preserve_source": _bool,
    "socket_mark": _int_range(0, 0xFFFFFFFF),
    "connect_timeout": _seconds(0.1, 300),
    "tls_handshake_timeout": _seconds(0.1, 300),
    "endpoint_failure_cooldown": _seconds(0, 3600),
    "pool_max_streams": _int_range(1, 1000),
    "pool_idle_timeout": _seconds(0.1, 86400),
    # RFC 9113: SETTINGS_MAX_FRAME_SIZE is 16 KiB .. 16 MiB - 1.
    "max_frame_size": _int_range(16384, (1 << 24) - 1),
    # Flow-control windows: at least the protocol's 65535, at most 2^31 - 1.
    "stream_window": _int_range(65535, (1 << 31) - 1),
    "connection_window": _int_range(65535, (1 << 31) - 1),
    # Limits against hostile peers (docs/ztproxy.md, Security).
    "max_header_list_size": _int_range(1024, 1 << 20),
    "header_timeout": _seconds(0.1, 300),
    "preface_timeout": _seconds(0.1, 300),
    "idle_timeout": _seconds(1, 86400),
    "max_connections_per_peer": _int_range(1, 100000),
    "max_plaintext_connections_per_peer": _int_range(1, 100000),
    "max_stream_resets": _int_range(1, 100000),
    "connection_write_buffer": _int_range(16384, 64 << 20),
    "drain_timeout": _seconds(0, 3600),
    "reload_interval": _seconds(0.05, 3600),
    "log_level": _choice(*LOG_LEVELS),
    "log_format": _choice(*LOG_FORMATS),
}

# Sections: the dataclass each builds and the checker of each of its keys.
_SECTIONS: Dict[str, Tuple[Type[Any], Dict[str, Checker]]] = {
    "listen": (ListenSettings, {
        "outbound": _listen_address,
        "inbound": _listen_address,
        "inbound_plaintext": _listen_address,
        "transparent": _bool,
        "dns": _listen_address,
        "admin": _listen_address,
        "metrics": _listen_address,
        "readiness": _listen_address,
    }),
    "dns": (DnsSettings, {
        "upstreams": _list_of(_dns_upstream, "nameservers such as ['192.0.2.53', '[2001:db8::53]:53']"),
        "resolv_conf": _path,
        "search_domains": _optional(_list_of(_dns_name, "domains such as ['corp.example']")),
        "domain": _dns_name,
    }),
    "access_log": (AccessLogSettings, {
        "format": _optional(_choice(*ACCESS_LOG_FORMATS)),
        "log_open": _bool,
    }),
    "ca": (CaSettings, {
        "addresses": _list_of(_ca_address, f"CA addresses such as ['10.0.0.5:{DEFAULT_CA_PORT}']"),
        "identity": _optional(_spiffe_id),
        "server_name": _optional(_dns_name),
        "token_file": _optional(_path),
        "cert_ttl": _int_range(60, MAX_CERT_TTL),  # as ztmesh_ca: shorter cannot be renewed in time
        "renew_fraction": _fraction(0.1, 0.9),
    }),
    "revocation": (RevocationSettings, {
        "deny_list": _optional(_path),
        "crls": _list_of(_path, "absolute paths of CRL files"),
    }),
}


def _unknown_key(key: str, known) -> ConfigError:
    return ConfigError(f"settings key '{key}' is unknown; known keys: {', '.join(sorted(known))}")


def _section(name: str, raw: Any) -> Any:
    cls, checkers = _SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(name, raw, f"a mapping with the keys {', '.join(checkers)}")
    values: Dict[str, Any] = {}
    for key, value in raw.items():
        if key not in checkers:
            raise _unknown_key(f"{name}.{key}", [f"{name}.{k}" for k in checkers])
        values[key] = checkers[key](f"{name}.{key}", value)
    return cls(**values)


def _check_consistency(settings: Settings) -> None:
    """Rules that involve several keys."""
    if settings.stream_window > settings.connection_window:
        raise ConfigError(f"settings key 'stream_window': {settings.stream_window} is larger than "
                          f"'connection_window' ({settings.connection_window}): expected at most that")
    listen = settings.listen
    bound: Dict[Address, str] = {}
    for name in ("outbound", "inbound", "inbound_plaintext", "dns", "admin", "metrics", "readiness"):
        address = getattr(listen, name)
        if address is None or address[1] == 0:  # port 0: the kernel picks a free one
            continue
        for other, other_name in bound.items():
            # A wildcard address (0.0.0.0, ::) takes the port on every address.
            if other[1] == address[1] and (other[0] == address[0] or _is_wildcard(other[0])
                                           or _is_wildcard(address[0])):
                raise ConfigError(f"settings key 'listen.{name}': {address[0]}:{address[1]} collides with "
                                  f"'listen.{other_name}' ({other[0]}:{other[1]}): expected a different port "
                                  "for each listener")
        bound[address] = name
    dns = listen.dns
    for i, upstream in enumerate(settings.dns.upstreams):
        if dns is not None and upstream[1] == dns[1] and upstream[0] in (dns[0], "127.0.0.1", "::1"):
            raise ConfigError(f"settings key 'dns.upstreams[{i}]': {upstream[0]}:{upstream[1]} is the "
                              "DNS proxy's own address: expected the node's real nameservers")


def _is_wildcard(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_unspecified


def settings_from_dict(data: Any) -> Settings:
    """Validate a parsed settings document and build Settings (defaults for absent keys)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the settings file must be a YAML mapping of keys, got {type(data).__name__}")
    values: Dict[str, Any] = {}
    for key, raw in data.items():
        if key in _SECTIONS:
            values[key] = _section(key, raw)
        elif key in _TOP_KEYS:
            values[key] = _TOP_KEYS[key](key, raw)
        else:
            raise _unknown_key(str(key), list(_TOP_KEYS) + list(_SECTIONS))
    if "node_name" not in values:
        raise ConfigError("settings key 'node_name' is required: the name of this node as the mesh "
                          "state's workloads give it in their 'node' field")
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def settings_to_dict(settings: Settings) -> Dict[str, Any]:
    """Settings as the file would spell them (addresses as 'IP:PORT'), e.g. for the admin config dump."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
                and isinstance(value[1], int) and not isinstance(value[1], bool):
            host, port = value
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    out: Dict[str, Any] = {}
    for name in Settings.__dataclass_fields__:
        value = getattr(settings, name)
        if name in _SECTIONS:
            out[name] = {key: plain(getattr(value, key)) for key in _SECTIONS[name][1]}
        else:
            out[name] = plain(value)
    return out


def load_settings(path: str) -> Settings:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from None
    try:
        return settings_from_dict(data if data is not None else {})
    except ConfigError as exc:
        raise ConfigError(f"settings file {path}: {exc}") from None
