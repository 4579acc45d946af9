"""The data plane's hooks for authorization and telemetry (contract: docs/hooks-contract.md).

The data plane calls an ``Authorizer`` for every inbound connection and a ``ConnectionObserver`` for
every proxied connection. Implementations live elsewhere (ztproxy.authz, ztproxy.telemetry); the Proxy
is constructed with them (ztproxy.app.App does it for ``ztproxy run``). A denied connection is
never passed to ``ConnectionObserver.opened`` by the data plane: the authorizer installed by the app
records it, so it is counted once. ``AllowAll`` and ``NoObserver`` are the defaults of a Proxy built
without policy or telemetry: they are what they say, not an authorization engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol


@dataclass(frozen=True)
class ConnContext:
    """One proxied connection as the hooks see it."""

    direction: str  # 'inbound' | 'outbound'
    reporter: str  # 'source' (outbound side) | 'destination' (inbound side)
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    src_identity: Optional[str]  # SPIFFE ID of the peer (inbound HBONE) or of the source workload
    dst_identity: Optional[str]
    src_workload: Any  # ztproxy.state.Workload or None
    dst_workload: Any  # ztproxy.state.Workload or None
    dst_service: Optional[str]  # service hostname when the client dialled a service VIP
    protocol: str  # 'HBONE' | 'TCP'
    security_policy: str  # 'mutual_tls' | 'none'


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class Authorizer(Protocol):
    def authorize(self, conn: ConnContext) -> Decision: ...


class ConnTracker(Protocol):
    def add_sent(self, n: int) -> None: ...

    def add_received(self, n: int) -> None: ...

    def closed(self, error: Optional[str]) -> None: ...


class ConnectionObserver(Protocol):
    def opened(self, conn: ConnContext) -> ConnTracker: ...


class AllowAll:
    """Allows every connection: the behaviour of a mesh without authorization policies."""

    def authorize(self, conn: ConnContext) -> Decision:
        return Decision(True, "no authorizer configured")


class _NoTracker:
    def add_sent(self, n: int) -> None:
        pass

    def add_received(self, n: int) -> None:
        pass

    def closed(self, error: Optional[str]) -> None:
        pass


class NoObserver:
    """Records nothing: the behaviour of a proxy without telemetry."""

    _tracker = _NoTracker()

    def opened(self, conn: ConnContext) -> ConnTracker:
        return self._tracker
