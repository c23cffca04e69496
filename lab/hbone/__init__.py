"""HBONE: HTTP/2 CONNECT over mTLS, the tunnel of Istio ambient (ztunnel src/proxy/h2/,
pool.rs, outbound.rs `create_hbone_request`, inbound.rs).

Layers on the wire: TCP to port 15008 -> mTLS (SPIFFE identities, ALPN h2) -> HTTP/2 ->
one CONNECT stream per application TCP connection, whose body is the raw TCP bytes.

- `headers`: the CONNECT request as data (authority, baggage, forwarded, traceparent).
- `client`: `HboneConnection`, `HboneConnectionPool`, `open_hbone_connection`.
- `server`: `serve_hbone` for one accepted connection.
- `stream`: `HboneStream` (StreamReader/Writer-like) and `copy_bidirectional`.
- `wire`: asyncio protocols that hand received bytes on without a StreamReader's copies.

TLS is not made here: callers pass asyncio streams already wrapped in TLS (lab.tls builds
the contexts), or plain ones in tests.
"""

from lab.hbone.client import (
                              HboneConnection,
                              HboneConnectionFull,
                              HboneConnectionPool,
                              HboneHttpError,
                              open_hbone_connection,
)
from lab.hbone.headers import (
                              Baggage,
                              HboneRequest,
                              create_hbone_request,
                              format_authority,
                              parse_authority,
                              parse_traceparent,
)
from lab.hbone.server import (
                              ConnectRequest,
                              HboneServerConnection,
                              RejectedStream,
                              serve_hbone,
                              validate_connect_request,
)
from lab.hbone.stream import HboneConnectionLost, HboneError, HboneStream, HboneStreamReset, copy_bidirectional

__all__ = [
    "Baggage", "ConnectRequest", "HboneConnection", "HboneConnectionFull", "HboneConnectionLost",
    "HboneConnectionPool", "HboneError", "HboneHttpError", "HboneRequest", "HboneServerConnection",
    "HboneStream", "HboneStreamReset", "RejectedStream", "copy_bidirectional", "create_hbone_request",
    "format_authority", "open_hbone_connection", "parse_authority", "parse_traceparent", "serve_hbone",
    "validate_connect_request",
]
