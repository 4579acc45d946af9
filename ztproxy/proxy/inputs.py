"""ProxyInputs: everything a connection handler of the proxy may use, built once by the proxy (ztunnel's
``ProxyInputs``). Handlers (inbound, inbound_passthrough, outbound) receive this frozen object, never
the proxy itself, so the layers point one way: the proxy builds the handlers, the handlers know only
their inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ztproxy.certs import CertStore
from ztproxy.config import Settings
from ztproxy.hooks import Authorizer, ConnectionObserver
from ztproxy.proxy.connection_manager import ConnectionManager
from ztproxy.proxy.h2.session import H2Limits
from ztproxy.proxy.pool import HbonePool
from ztproxy.state import MeshState


@dataclass(frozen=True)
class ProxyInputs:
    settings: Settings
    # The mesh state in force now: it is replaced on reload, so handlers ask for it per connection.
    state: Callable[[], MeshState]
    certs: CertStore
    pool: HbonePool
    authorizer: Authorizer
    observer: ConnectionObserver
    limits: H2Limits
    connections: ConnectionManager
