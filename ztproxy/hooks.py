"""The data plane's hooks for authorization and telemetry (docs/architecture.md, "The data plane's two
hooks").

The data plane calls an ``Authorizer`` for every inbound connection and a ``ConnectionObserver`` for
every proxied connection. Implementations live elsewhere (ztproxy.authz, ztproxy.telemetry); the Proxy
is constructed with them (ztproxy.app.App does it for ``ztproxy run``). A denied connection is
never passed to ``ConnectionObserver.opened`` by the data plane: the authorizer installed by the app
records it, so it is counted once. ``AllowAll`` and ``NoObserver`` are the defaults of a Proxy built
without policy or telemetry: they are what they say, not an authorization engine.

A connection that fails is closed with a ``Failure``: a ``Reason`` (a value tests and metrics match on,
mapped to ztunnel's response flag) and a detail for people (the access log's ``error``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional, Protocol

# ztunnel's ResponseFlags (src/proxy/metrics.rs): AuthorizationPolicyDenied and ConnectionFailure; a
# connection that ended without error carries "-".
RESPONSE_FLAG_NONE = "-"
RESPONSE_FLAG_DENY = "DENY"
RESPONSE_FLAG_CONNECT = "CONNECT"


class Reason(enum.Enum):
    """Why a proxied connection failed."""

    DENIED = "denied"  # an authorization policy refused it
    CONNECT_FAILED = "connect_failed"  # the upstream or HBONE connection could not be made
    HBONE_REFUSED = "hbone_refused"  # the destination answered the CONNECT with another status than 200
    STREAM_RESET = "stream_reset"  # the peer reset the HTTP/2 stream
    CONNECTION_LOST = "connection_lost"  # a TCP or HBONE connection ended before both directions had
    CLIENT_LOST = "client_lost"  # the client went away before its tunnel was up
    SHUTDOWN = "shutdown"  # the proxy closed it at the end of a drain

    @property
    def response_flag(self) -> str:
        """ztunnel's response flag: DENY for a denial, CONNECT for every other failure."""
        return RESPONSE_FLAG_DENY if self is Reason.DENIED else RESPONSE_FLAG_CONNECT


@dataclass(frozen=True)
class Failure:
    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        return self.detail or self.reason.value


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

    def closed(self, failure: Optional[Failure] = None) -> None: ...


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

    def closed(self, failure: Optional[Failure] = None) -> None:
        pass


class NoObserver:
    """Records nothing: the behaviour of a proxy without telemetry."""

    _tracker = _NoTracker()

    def opened(self, conn: ConnContext) -> ConnTracker:
        return self._tracker
