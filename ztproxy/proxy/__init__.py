"""The data plane, laid out as ztunnel's ``src/proxy``.

- ``proxy``: ``Proxy`` binds the listeners, reloads mesh state and certificates, drains; it builds one
  frozen ``ProxyInputs`` (``inputs``) and the handlers below, which receive that and never the proxy.
- ``outbound`` (15001), ``inbound`` (15008, HBONE), ``inbound_passthrough`` (15006, plaintext): the
  connection handlers.
- ``pool``: HBONE client connections shared by outbound streams.
- ``h2``: HTTP/2 (session, zero-copy frames, client connection).
- ``copy``: the byte pumps and the small interface (``StreamCarrier``) they need of a connection.
- ``connection_manager``: what is open, for drain; ``listener``, ``origdst``, ``upstream``: sockets.

Layers point one way: proxy -> handlers -> pool -> h2 -> copy.
"""

from ztproxy.proxy.inputs import ProxyInputs
from ztproxy.proxy.proxy import Proxy, StartupError, load_revocation

__all__ = ["Proxy", "ProxyInputs", "StartupError", "load_revocation"]
