"""HTTP/2 for HBONE: the session driving h2 over TLS (session), the zero-copy frame layer underneath h2
(frames), the server side's timeouts and GOAWAY handling (server) and the client connection that opens
CONNECT streams (client). Answering a CONNECT is the inbound handler's (ztproxy.proxy.inbound)."""
