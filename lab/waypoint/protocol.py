"""Which filter chain a waypoint gives a Service port: HTTP, TCP, or decided by sniffing.

Real istiod builds, per Service port the waypoint serves, an HTTP chain (HTTP connection manager:
routes, L7 policy, retries) or a TCP chain (Envoy's `tcp_proxy`: bytes forwarded to the
`inbound-vip|<port>|tcp|<host>` cluster, L4 only), chosen by the port's protocol
(is:pilot/pkg/networking/core/listener_waypoint.go `buildWaypointInternal`). The protocol comes
from Kubernetes, as Istio reads it (is:pkg/config/protocol, `kube.ConvertProtocol`):

1. the port's `appProtocol` (`http`, `http2`, `grpc`, `tcp`, `tls`, ..., or `kubernetes.io/h2c`);
2. else the port name's prefix: `http`, `http-web`, `grpc-api`, `tcp-echo`, `redis`...;
3. else it is "unsupported": Envoy's protocol detection (the `http_inspector` listener filter)
   looks at the first bytes the client sends. An HTTP/1.x request line or the HTTP/2 preface goes
   to the HTTP chain, anything else to the TCP chain. A client that sends nothing first (a
   server-speaks-first protocol) is treated as TCP after `SNIFF_TIMEOUT`.

Everything here is pure except `sniff`, which only waits for the first bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

HTTP, HTTP2, GRPC, TCP, AUTO = "http", "http2", "grpc", "tcp", "auto"

#: Istio's protocol names (lower case) and what chain each gets in a waypoint.
HTTP_PROTOCOLS = {"http": HTTP, "http2": HTTP2, "grpc": GRPC, "grpc-web": GRPC, "h2c": HTTP2,
                  "kubernetes.io/h2c": HTTP2}
TCP_PROTOCOLS = {"tcp", "tls", "https", "mongo", "mysql", "redis", "udp", "kubernetes.io/ws",
                 "kubernetes.io/wss"}
SNIFF_TIMEOUT = 1.0  # seconds the lab waits for a client's first bytes on an unnamed port

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ",
                b"PATCH ")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def parse_protocol(word: str) -> str:
    """One protocol word (an appProtocol, or a port name's prefix) -> HTTP, HTTP2, GRPC, TCP, or AUTO."""
    w = word.strip().lower()
    if w in HTTP_PROTOCOLS:
        return HTTP_PROTOCOLS[w]
    if w in TCP_PROTOCOLS:
        return TCP
    return AUTO


def port_protocol(port: dict[str, Any] | None) -> str:
    """A Service port (`name`, `app_protocol`) -> the protocol the waypoint serves it with."""
    if not port:
        return AUTO
    if port.get("app_protocol"):
        return parse_protocol(str(port["app_protocol"]))
    name = str(port.get("name") or "")
    return parse_protocol(name.split("-", 1)[0]) if name else AUTO


def classify_first_bytes(data: bytes) -> str:
    """Envoy's http_inspector on the first bytes of a connection: HTTP, HTTP2, or TCP.

    A prefix of a request line or of the HTTP/2 preface is not enough to say TCP yet; callers
    wait for more bytes while `could_still_be_http` says so."""
    if data.startswith(H2_PREFACE):
        return HTTP2
    if any(data.startswith(m) for m in HTTP_METHODS) and b" HTTP/1." in data.split(b"\r\n", 1)[0]:
        return HTTP
    return TCP


def could_still_be_http(data: bytes) -> bool:
    """Are these bytes a proper prefix of an HTTP/1.x request line or of the HTTP/2 preface?"""
    if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
        return True
    line = data.split(b"\r\n", 1)[0]
    if b"\r\n" in data:
        return False
    return any(m.startswith(data[: len(m)]) for m in HTTP_METHODS) and len(line) < 8192


async def sniff(reader: Any, timeout: float = SNIFF_TIMEOUT) -> str:
    """Wait for the client's first bytes on `reader` (an HttpReader; they stay buffered for the
    chain that follows) and classify them. No byte in `timeout`: TCP."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        data = reader.peek()
        if data and not could_still_be_http(data):
            return classify_first_bytes(data)
        remaining = deadline - loop.time()
        if remaining <= 0:
            return classify_first_bytes(data) if data else TCP
        try:
            more = await asyncio.wait_for(reader.fill(), remaining)
        except asyncio.TimeoutError:
            return classify_first_bytes(data) if data else TCP
        if not more:  # the client closed: whatever it sent decides
            return classify_first_bytes(reader.peek()) if reader.peek() else TCP
