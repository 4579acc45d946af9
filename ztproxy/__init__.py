"""ztproxy: the ztmesh node proxy, an HBONE (HTTP/2 CONNECT in mutual TLS) data plane compatible with
Istio's ztunnel."""

__version__ = "0.1.0"
