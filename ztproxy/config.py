"""Proxy settings: every default of ztproxy lives in this module (as ztunnel keeps them in config.rs).

The settings file is YAML. Each key is validated; an error names the key, the bad value and what is
expected, so an operator can fix the file without reading code. See docs/ztproxy.md for the reference.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import yaml

# Ports of ztunnel (docs/ztproxy.md, DESIGN 3.1).
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008

DEFAULT_TRUST_DOMAIN = "cluster.local"
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
DEFAULT_MAX_FRAME_SIZE = 1 << 20
DEFAULT_STREAM_WINDOW = 4 << 20
DEFAULT_CONNECTION_WINDOW = 16 << 20
DEFAULT_DRAIN_TIMEOUT = 5.0
# How often the mesh state and certificate files are checked for changes.
DEFAULT_RELOAD_INTERVAL = 1.0
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "text"

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A settings file that cannot be used; the message says which key and what to write instead."""


@dataclass(frozen=True)
class ListenSettings:
    outbound: Optional[Tuple[str, int]] = ("0.0.0.0", OUTBOUND_PORT)
    inbound: Optional[Tuple[str, int]] = ("0.0.0.0", HBONE_PORT)
    inbound_plaintext: Optional[Tuple[str, int]] = ("0.0.0.0", INBOUND_PLAINTEXT_PORT)
    # IP_TRANSPARENT on the listeners: needed for TPROXY capture (needs CAP_NET_ADMIN).
    transparent: bool = True


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
    # client, as DESIGN 2.2 describes; needs the node's return-path rules.
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
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    reload_interval: float = DEFAULT_RELOAD_INTERVAL
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = DEFAULT_LOG_FORMAT

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
    if "/" in value or ":" in value or value != value.strip() or value.lower() != value:
        raise _fail(key, value, "a SPIFFE trust domain such as 'cluster.local' (lowercase, no '/' or ':')")
    return value


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


def _listen_address(key: str, value: Any) -> Optional[Tuple[str, int]]:
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


_LISTEN_KEYS: Dict[str, Checker] = {
    "outbound": _listen_address,
    "inbound": _listen_address,
    "inbound_plaintext": _listen_address,
    "transparent": _bool,
}

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
    "drain_timeout": _seconds(0, 3600),
    "reload_interval": _seconds(0.05, 3600),
    "log_level": _choice(*LOG_LEVELS),
    "log_format": _choice(*LOG_FORMATS),
}


def _unknown_key(key: str, known) -> ConfigError:
    return ConfigError(f"settings key '{key}' is unknown; known keys: {', '.join(sorted(known))}")


def settings_from_dict(data: Any) -> Settings:
    """Validate a parsed settings document and build Settings (defaults for absent keys)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the settings file must be a YAML mapping of keys, got {type(data).__name__}")
    values: Dict[str, Any] = {}
    for key, raw in data.items():
        if key == "listen":
            continue
        if key not in _TOP_KEYS:
            raise _unknown_key(str(key), list(_TOP_KEYS) + ["listen"])
        values[key] = _TOP_KEYS[key](key, raw)
    if "node_name" not in values:
        raise ConfigError("settings key 'node_name' is required: the name of this node as the mesh "
                          "state's workloads give it in their 'node' field")
    listen_raw = data.get("listen", {}) or {}
    if not isinstance(listen_raw, dict):
        raise _fail("listen", listen_raw, "a mapping with outbound, inbound, inbound_plaintext, transparent")
    listen_values = {}
    for key, raw in listen_raw.items():
        if key not in _LISTEN_KEYS:
            raise _unknown_key(f"listen.{key}", [f"listen.{k}" for k in _LISTEN_KEYS])
        listen_values[key] = _LISTEN_KEYS[key](f"listen.{key}", raw)
    settings = Settings(listen=ListenSettings(**listen_values), **values)
    if settings.stream_window > settings.connection_window:
        raise ConfigError(f"settings key 'stream_window': {settings.stream_window} is larger than "
                          f"'connection_window' ({settings.connection_window}): expected at most that")
    return settings


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
