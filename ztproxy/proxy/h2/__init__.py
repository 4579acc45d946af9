"""HTTP/2 for HBONE: the session driving h2 over TLS (session), the zero-copy frame layer underneath h2
(frames) and the client connection that opens CONNECT streams (client). The server side's request
handling is the inbound handler's (ztproxy.proxy.inbound)."""
