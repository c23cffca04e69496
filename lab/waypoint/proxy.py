"""The waypoint's per-request pipeline: what the Envoy of an Istio waypoint does with one HBONE
tunnel and the HTTP/1.1 requests inside it (reference/istio-ambient.md §2.5, §6).

In Istio the waypoint is Envoy with three listeners that istiod generates
(is:pilot/pkg/networking/core/listener_waypoint.go, cluster_waypoint.go):

1. `connect_terminate` (0.0.0.0:15008): mTLS with the waypoint's own certificate, client
   certificate required; HTTP/2 CONNECT; the `:authority` (the Service VIP:port the client
   addressed, as the source ztunnel sent it) is kept as the original destination. The client's
   SPIFFE identity from this handshake is what L7 policies see as the source.
2. `main_internal`: one filter chain per served Service VIP:port (and per pod IP for
   workload-attached waypoints); an HTTP connection manager parses HTTP, runs the RBAC filter
   (L7 AuthorizationPolicy), then the router (HTTPRoute: matches, weighted backends, filters,
   retries, timeouts), picks an endpoint of the chosen backend cluster
   `inbound-vip|<port>|http|<hostname>`, with the cluster's circuit breakers and outlier
   detection (DestinationRule).
3. `connect_originate`: a NEW HBONE tunnel, with the waypoint's own identity, to
   `podIP:15008`, `:authority podIP:targetPort`. Two sequential tunnels, never nested.

`WaypointProxy.handle_connect` is steps 1-3 for one CONNECT stream; the decisions are the pure
modules of this package (config, authz, routes, filters, breaker, telemetry, flows), called in
the order lab/waypoint/__init__.py lists. This module does the I/O around them:

- HTTP/1.1 inside the tunnel (`HttpReader`, `read_request`): keep-alive, pipelining,
  `Content-Length` and chunked bodies (request bodies are buffered whole, as Envoy buffers a
  request it may retry or mirror), `Expect: 100-continue`. A malformed request gets 400 and, as
  HTTP says, the connection (the CONNECT stream) is closed after it; a header block over
  60 KiB (Envoy's `max_request_headers_kb` default) gets 431, also closing. Closing ends the
  stream (END_STREAM), then waits up to 1 s for the client's end (Envoy's delayed close).
- Envoy's local replies: 403 `RBAC: access denied`, 404 (no route, flag NR), 500 (invalid
  backend), 503 `no healthy upstream` (UH), 503 overflow (UO), 503 connection failure (UF),
  503 reset before the response (UC), 502 bad upstream response (UPE), 504 timeout (UT).
- Upstream HTTP/1.1 connections per backend: each is one HBONE CONNECT stream to a pod, reused
  for later requests (keep-alive), counted by the cluster's `CircuitBreaker`; retries per the
  route's `RetryPolicy`, avoiding endpoints already tried; `timeouts.request` bounds the whole
  request, `timeouts.backendRequest` each try.
- `RequestMirror`: a copy sent fire-and-forget on a stream of its own; its answer is dropped.
- Telemetry per request: Envoy's access log line, istio_requests_total, a mitmproxy flow, and
  events `waypoint.*` carrying the flow id of the incoming CONNECT's `traceparent`, so the source
  ztunnel's, the waypoint's and the destination ztunnel's steps form one flow.
- Step mode (the lab's mesh debugger, lab/ztunnel/stepper.py): a request of a tunnel that arrived
  after step mode was turned on waits before its route, its L7 policy decision, the router's
  action and each tunnel out, until the learner releases it.

Lab choices (said where they matter): a tunnel the waypoint cannot open to a pod (TCP, TLS, or a
CONNECT answered with anything but 200, e.g. 401 from the destination ztunnel's L4 policy) counts
as Envoy's `connect-failure` (503 UF, retried by Istio's default policy); the backend's SAN
check is Istio's prefix matcher (see `upstream_san_prefix`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mitmproxy import http as mhttp

from lab.hbone import (
    HboneConnection,
    HboneConnectionPool,
    HboneError,
    HboneHttpError,
    HboneStream,
    open_hbone_connection,
)
from lab.hbone.headers import Baggage, HboneRequest, create_hbone_request, parse_baggage, parse_forwarded
from lab.tls.certificate import identities_in_cert, peer_certificate
from lab.tls.identity import Identity
from lab.waypoint import authz, protocol, routes, tcp_proxy
from lab.waypoint import filters as flt
from lab.waypoint.breaker import (
    ACTIVE,
    NO_HEALTHY_UPSTREAM_BODY,
    NO_HEALTHY_UPSTREAM_FLAG,
    OVERFLOW,
    OVERFLOW_DETAILS,
    OVERFLOW_FLAG,
    PENDING,
    CircuitBreaker,
    OutlierDetector,
    Ticket,
)
from lab.waypoint.config import Backend, Endpoint, ServiceConfig, WaypointConfig
from lab.waypoint.flows import FlowFile, flow_state
from lab.waypoint.http1 import (  # noqa: F401 - the HTTP/1.1 codec (tests import its names from here too)
    HOP_BY_HOP,
    MAX_REQUEST_BODY,
    MAX_REQUEST_HEADERS,
    MAX_RESPONSE_HEADERS,
    READ_CHUNK,
    SERVER_HEADER,
    HttpError,
    HttpReader,
    HttpRequest,
    HttpResponseHead,
    LimitExceeded,
    Source,
    connection_tokens,
    get_header,
    head_lines,
    header_pairs,
    http_date,
    local_reply,
    read_chunked,
    read_request,
    read_response_head,
    response_body,
    response_body_size,
    serialize_head,
    strip_hop_by_hop,
    wants_close,
)
from lab.waypoint.protocol import port_protocol
from lab.waypoint.telemetry import UNKNOWN, Metrics, Peer, RequestRecord, TraceContext, format_access_log, next_hop
from lab.ztunnel.stepper import Stepper

log = logging.getLogger("waypoint")

Header = tuple[str, str]
Emit = Callable[..., Any]

#: How much of a response body is kept for the flow file (the client gets all of it).
FLOW_BODY_LIMIT = 1024 * 1024
#: The HBONE port of every pod (connect_originate's UpstreamPortOverride).
HBONE_PORT = 15008

#: Envoy's local reply bodies and response code details for upstream failures.
UPSTREAM_FAILURES: dict[str, tuple[int, str, str, str]] = {
    # outcome: (status, flag, response code details, body)
    "connect-failure": (503, "UF", "upstream_reset_before_response_started{connection_failure}",
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
    "reset": (503, "UC", "upstream_reset_before_response_started{connection_termination}",
              "upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
    "per-try-timeout": (504, "UT", "upstream_per_try_timeout", "upstream request timeout"),
    "protocol-error": (502, "UPE", "upstream_reset_before_response_started{protocol_error}",
                       "upstream connect error or disconnect/reset before headers. reset reason: protocol error"),
    "overflow": (503, OVERFLOW_FLAG, OVERFLOW_DETAILS,
                 "upstream connect error or disconnect/reset before headers. reset reason: overflow"),
    "no-healthy-upstream": (503, NO_HEALTHY_UPSTREAM_FLAG, "no_healthy_upstream", NO_HEALTHY_UPSTREAM_BODY),
}
#: Envoy prints the response flags of a request in the order of its flag table.
FLAG_ORDER = ("LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX",
              "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR")
#: Envoy's delayed_close_timeout: after its last response on a closing connection, Envoy waits
#: this long for the client to close its side, so the client reads the whole response first.
DELAYED_CLOSE_TIMEOUT = 1.0
RETRY_LIMIT_FLAG = "URX"
TIMEOUT_FLAG = "UT"
DOWNSTREAM_TERMINATION_FLAG = "DC"
#: Envoy's flag for a request its HTTP/1 codec refused (malformed, header block too large).
DOWNSTREAM_PROTOCOL_ERROR_FLAG = "DPE"


# ---------------------------------------------------------------------------------------------
# connect_originate: the tunnel to a backend pod


def upstream_san_prefix(trust_domain: str, waypoint_namespace: str) -> str:
    """The SAN the waypoint accepts from a backend pod's certificate.

    Istio does NOT check the destination workload's exact identity here (ztunnel does, with
    `upstream_sans`): the `connect_originate` cluster that istiod builds for a waypoint
    (is:pilot/pkg/networking/core/cluster_waypoint.go) has a *prefix* SAN matcher,
    `spiffe://<trust domain>/ns/<waypoint namespace>/sa/`, unless SkipValidateTrustDomain is
    set (reference §6). So any workload identity of the waypoint's namespace is accepted, and a
    backend in another namespace would fail the check, exactly as the generated Envoy config
    says. The lab reproduces that rule literally."""
    return f"spiffe://{trust_domain}/ns/{waypoint_namespace}/sa/"


def matching_san(presented: Sequence[Identity], prefix: str) -> Identity | None:
    """The first presented identity whose URI starts with `prefix` (Envoy's SAN prefix match)."""
    return next((i for i in presented if i.uri.startswith(prefix)), None)


class UpstreamConnectError(Exception):
    """No tunnel to the pod: TCP, TLS, the SAN check, or a CONNECT answered with non-200."""


@dataclass
class UpstreamTunnel:
    """One CONNECT stream to a pod, answered 200: an upstream HTTP/1.1 connection for Envoy."""

    stream: HboneStream
    peer_identity: Identity | None = None
    new_connection: bool = False  # a new mTLS + HTTP/2 connection was opened for it
    local: str = ""  # the waypoint's address of the HBONE connection (UPSTREAM_LOCAL_ADDRESS)
    remote: str = ""  # podIP:15008


Connector = Callable[[Endpoint, HboneRequest], Awaitable[UpstreamTunnel]]


class HboneUpstream:
    """connect_originate: HBONE tunnels from the waypoint to backend pods, pooled per
    destination pod (one mTLS + HTTP/2 connection carries up to 100 CONNECT streams), always
    presenting the waypoint's OWN certificate. `client_context()` returns the current client
    SSLContext (rebuilt by the caller when the certificate rotates)."""

    def __init__(self, client_context: Callable[[], Awaitable[Any]], san_prefix: str, *,
                 connect_timeout: float = 10.0) -> None:
        self.client_context = client_context
        self.san_prefix = san_prefix
        self.connect_timeout = connect_timeout
        self.pool: HboneConnectionPool[tuple[str, int]] = HboneConnectionPool(self._connect)

    async def _connect(self, dst: tuple[str, int]) -> HboneConnection:
        ctx = await self.client_context()
        identity: list[Any] = []

        def verify(ssl_object: Any) -> None:
            """Envoy's SAN matcher runs inside the handshake: check before any HTTP/2 byte is sent."""
            presented = identities_in_cert(peer_certificate(ssl_object))
            peer = matching_san(presented, self.san_prefix)
            if peer is None:
                raise UpstreamConnectError(f"peer did not present the expected SAN: wanted a URI starting with "
                                           f"{self.san_prefix}, got {[str(i) for i in presented]}")
            identity.append(peer)

        try:
            conn = await open_hbone_connection(dst[0], dst[1], ctx, timeout=self.connect_timeout, verify=verify)
        except (OSError, HboneError) as e:
            raise UpstreamConnectError(f"HBONE connect to {dst[0]}:{dst[1]} failed: {e}") from e
        conn.peer_identity = identity[0] if identity else None  # type: ignore[attr-defined]
        return conn

    async def __call__(self, endpoint: Endpoint, request: HboneRequest) -> UpstreamTunnel:
        dst = (endpoint.ip, HBONE_PORT)
        before = self.pool.connections_opened
        try:
            conn, stream = await self.pool.checkout(dst, request.header_list())
            await conn.await_response(stream)
        except HboneHttpError as e:
            raise UpstreamConnectError(f"the HBONE CONNECT to {request.authority} was answered {e.status}") from e
        except (OSError, HboneError) as e:
            raise UpstreamConnectError(f"HBONE CONNECT to {request.authority} failed: {e}") from e
        local = conn.writer.get_extra_info("sockname")
        return UpstreamTunnel(stream, getattr(conn, "peer_identity", None),
                              new_connection=self.pool.connections_opened != before,
                              local=f"{local[0]}:{local[1]}" if isinstance(local, tuple) else "",
                              remote=f"{dst[0]}:{dst[1]}")

    async def close(self) -> None:
        await self.pool.close()


# ---------------------------------------------------------------------------------------------
# Per-backend state: circuit breaker, outlier detection, upstream connections


@dataclass(eq=False)
class UpstreamConn:
    """An upstream HTTP/1.1 connection: one CONNECT stream to one pod, reused while kept alive."""

    id: int
    endpoint: Endpoint
    tunnel: UpstreamTunnel
    reader: HttpReader
    requests: int = 0

    def usable(self) -> bool:
        s = self.tunnel.stream
        return not s.is_closing() and not s.at_eof() and not self.reader.at_eof() and not self.reader.buffered

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.tunnel.stream.close()


class BackendState:
    """What the waypoint keeps per upstream cluster between requests: Envoy's circuit breaker
    counters, outlier detection, LEAST_REQUEST counts, the ROUND_ROBIN position, and the
    kept-alive upstream connections (each the stream of one breaker connection)."""

    def __init__(self, backend: Backend, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.breaker = CircuitBreaker(backend.policy.connection_pool, backend.cluster_name)
        self.outlier = OutlierDetector(backend.policy.outlier_detection, clock=clock) \
            if backend.policy.outlier_detection else None
        if self.outlier:
            self.outlier.update_hosts(e.address for e in backend.endpoints)
        self.active: dict[str, int] = {}
        self._rr = itertools.count()
        self.conns: dict[int, UpstreamConn] = {}
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def update(self, backend: Backend, clock: Callable[[], float] = time.monotonic) -> None:
        """New config for the same cluster: new thresholds, endpoints; stale connections closed."""
        self.backend = backend
        self.breaker.settings = backend.policy.connection_pool
        od = backend.policy.outlier_detection
        if od is None:
            self.outlier = None
        elif self.outlier is None or self.outlier.settings != od:
            self.outlier = OutlierDetector(od, clock=clock)
        if self.outlier:
            self.outlier.update_hosts(e.address for e in backend.endpoints)
        live = {e.address for e in backend.endpoints}
        for cid, conn in list(self.conns.items()):
            if conn.endpoint.address not in live:
                conn.close()
                del self.conns[cid]

    def next_rr(self) -> int:
        return next(self._rr)

    def available(self) -> list[Endpoint]:
        eps = list(self.backend.endpoints)
        return self.outlier.available(eps) if self.outlier else eps

    async def wait_pending(self, ticket: Ticket) -> None:
        """Wait until a pending request gets a connection (cancelled: it leaves the queue)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting[ticket.id] = fut
        try:
            await fut
        except BaseException:
            self.breaker.cancel(ticket)
            raise
        finally:
            self._waiting.pop(ticket.id, None)

    def release(self, ticket: Ticket, keep_alive: bool) -> None:
        """The request on `ticket` is done: give back its connection, wake promoted waiters,
        close the streams of connections the breaker no longer counts."""
        promoted = self.breaker.release(ticket, keep_alive=keep_alive)
        for cid, conn in list(self.conns.items()):
            if cid not in self.breaker.connections:
                conn.close()
                del self.conns[cid]
        for t in promoted:
            fut = self._waiting.get(t.id)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True)
class TunnelPeer:
    """Who opened the tunnel to the waypoint (from its mTLS handshake and TCP connection)."""

    identity: Identity | None
    address: tuple[str, int]  # the source ztunnel's socket in the client pod: the client pod's IP
    local: tuple[str, int] = ("0.0.0.0", HBONE_PORT)


@dataclass
class Target:
    """What a CONNECT authority addresses: a served Service port, or (workload-attached
    waypoints) a pod IP, as Envoy's `main_internal` filter chains are keyed."""

    ip: str
    port: int
    service: ServiceConfig | None = None
    pod: Endpoint | None = None

    @property
    def protocol(self) -> str:
        """The port's protocol (lab/waypoint/protocol.py): which filter chain serves it."""
        return port_protocol(self.service.port_named(self.port)) if self.service is not None else protocol.AUTO

    @property
    def name(self) -> str:
        if self.service is not None:
            return f"{self.service.namespace}/{self.service.name}"
        assert self.pod is not None
        return f"pod {self.pod.namespace}/{self.pod.pod}"


@dataclass
class Attempt:
    """One try of a request upstream: its endpoint and connection, the response head, or why
    it failed (`failure` one of UPSTREAM_FAILURES' keys)."""

    endpoint: Endpoint | None = None
    ticket: Ticket | None = None
    conn: UpstreamConn | None = None
    response: HttpResponseHead | None = None
    failure: str = ""
    detail: str = ""
    sent_at: float = 0.0
    head_at: float = 0.0
    released: bool = False

    @property
    def outcome(self) -> int | str:
        return self.response.status if self.response is not None else self.failure


@dataclass
class Exchange:
    """Everything known about one request while it goes through the pipeline."""

    target: Target
    peer: TunnelPeer
    trace: TraceContext
    request: HttpRequest
    record: RequestRecord
    t0: float
    client_addr: tuple[str, int]
    source: Peer
    response_headers: list[Header] = field(default_factory=list)
    response_body: bytearray = field(default_factory=bytearray)
    response_reason: str = ""
    close_after: bool = False
    head_sent: bool = False
    aborted: bool = False
    opened: float = 0.0  # time.monotonic() when its tunnel arrived: step mode holds only new ones

    @property
    def flow(self) -> str:
        return self.trace.flow_id


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


class WaypointProxy:
    """The waypoint's data path (one per process). Call `update_config` with each new
    WaypointConfig, `handle_connect` for each CONNECT stream (the HBONE server's handler)."""

    def __init__(self, connector: Connector, *, identity: Identity, emit: Emit | None = None,
                 write_access_log: Callable[[str], None] | None = None, metrics: Metrics | None = None,
                 flows: FlowFile | None = None, pod: str = "", rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, cluster: str = "Kubernetes",
                 stepper: Stepper | None = None) -> None:
        self.connector = connector
        self.stepper = stepper if stepper is not None else Stepper(component="waypoint")  # step mode
        self.identity = identity
        self._emit = emit
        self.write_access_log = write_access_log or (lambda line: None)
        self.metrics = metrics or Metrics()
        self.flows = flows
        self.pod = pod
        self.rng = rng or random.Random()
        self.clock = clock
        self.cluster = cluster
        self.config: WaypointConfig | None = None
        self.backends: dict[tuple[str, str, int], BackendState] = {}
        self._mirrors: set[asyncio.Task[None]] = set()
        self._conn_ids = itertools.count(1)
        self.stats: dict[str, int] = {k: 0 for k in (
            "downstream_cx_total", "downstream_cx_active", "downstream_cx_rejected", "downstream_rq_total",
            "downstream_rq_1xx", "downstream_rq_2xx", "downstream_rq_3xx", "downstream_rq_4xx", "downstream_rq_5xx",
            "rbac_allowed", "rbac_denied", "upstream_cx_total", "upstream_cx_connect_fail", "upstream_rq_total",
            "upstream_rq_retry", "upstream_rq_retry_limit_exceeded", "upstream_rq_timeout",
            "upstream_rq_per_try_timeout", "upstream_rq_pending_total", "upstream_rq_overflow",
            "upstream_cx_destroy_remote", "mirror_rq_total", "mirror_rq_failed")}

    # -- config -----------------------------------------------------------------------------
    def update_config(self, cfg: WaypointConfig) -> None:
        """A new configuration (what istiod would push as xDS): keep per-cluster state for the
        clusters that remain, drop the others."""
        self.config = cfg
        keep: dict[tuple[str, str, int], BackendState] = {}
        for key, backend in cfg.backends.items():
            state = self.backends.get(key)
            if state is None:
                state = BackendState(backend, self.clock)
            else:
                state.update(backend, self.clock)
            keep[key] = state
        for key, state in self.backends.items():
            if key not in keep and key[0] != "pod":
                state.close()
        keep.update({k: s for k, s in self.backends.items() if k[0] == "pod"})
        self.backends = keep

    def resolve(self, ip: str, port: int) -> Target | None:
        """The Service (or pod) a CONNECT authority addresses, or None."""
        cfg = self.config
        if cfg is None:
            return None
        svc = cfg.service_at(ip, port)
        if svc is not None:
            return Target(ip, port, service=svc)
        pod = cfg.workloads.get(ip)
        if pod is not None:
            return Target(ip, port, pod=replace(pod, port=port))
        return None

    # -- events -----------------------------------------------------------------------------
    def emit(self, kind: str, msg: str, flow: str = "", **fields: Any) -> None:
        if self._emit is None:
            return
        try:
            self._emit(kind, msg, pod=self.pod, flow=flow, **fields)
        except Exception:  # observing must never break the data path
            log.exception("emitting %s failed", kind)

    @property
    def name(self) -> str:
        cfg = self.config
        return f"{cfg.namespace}/{cfg.name}" if cfg else "waypoint"

    async def hold(self, ex: Exchange, step: str, next_sentence: str) -> None:
        """Step mode: the request waits before `step` until the learner releases it
        (lab/ztunnel/stepper.py). Callers check ``self.stepper.on`` first."""
        await self.stepper.gate(ex.flow, step, next_sentence, started=ex.opened, pod=self.pod,
                                method=ex.request.method, path=ex.request.target, waypoint=self.name)

    # -- the tunnel -------------------------------------------------------------------------
    async def handle_connect(self, request: Any, respond: Callable[..., Awaitable[HboneStream | None]],
                             peer: TunnelPeer) -> None:
        """One CONNECT stream on 15008 (`lab.hbone.serve_hbone` handler): answer it, then serve
        the HTTP/1.1 requests inside until either side closes."""
        trace = next_hop(request.get("traceparent"), self.rng)
        ip, port = request.destination
        target = self.resolve(ip, port)
        who = str(peer.identity) if peer.identity else "a client without identity"
        headers = {k: v for k, v in request.headers if not k.startswith(":")}
        self.stats["downstream_cx_total"] += 1
        if target is None:
            # Envoy: the CONNECT is routed to main_internal, where no filter chain matches this
            # IP:port; the internal upstream connection fails and the CONNECT is answered 503.
            self.stats["downstream_cx_rejected"] += 1
            self.emit("waypoint.tunnel.in",
                      f"waypoint {self.name} refused an HBONE tunnel from {who} for {request.authority}: it serves "
                      f"no Service at that address, so it answered 503",
                      trace.flow_id, client_identity=str(peer.identity or ""), src=_fmt(peer.address),
                      authority=request.authority, accepted=False, status=503, headers=headers)
            await respond(503)
            return
        self.emit("waypoint.tunnel.in",
                  f"waypoint {self.name} accepted an HBONE tunnel from {who} at {_fmt(peer.address)} for "
                  f"{request.authority}, {target.name}",
                  trace.flow_id, client_identity=str(peer.identity or ""), src=_fmt(peer.address),
                  authority=request.authority, accepted=True, status=200, target=target.name,
                  stream_id=getattr(request, "stream_id", 0), headers=headers)
        stream = await respond(200)
        if stream is None:
            return
        forwarded = parse_forwarded(request.get("forwarded") or "")
        try:
            client_addr = forwarded.for_ip_port() if forwarded.for_addr else peer.address
        except ValueError:
            client_addr = peer.address
        source = self._source_peer(peer, request.get("baggage"))
        self.stats["downstream_cx_active"] += 1
        reader = HttpReader(stream)
        try:
            chain, why = await self.choose_chain(target, reader)
            if chain == protocol.HTTP:
                await self.serve_http(stream, target, peer, trace, client_addr, source, reader)
            else:
                await tcp_proxy.serve_tcp(self, stream, reader, target, peer, trace, client_addr, source, why)
        finally:
            self.stats["downstream_cx_active"] -= 1

    async def choose_chain(self, target: Target, reader: HttpReader) -> tuple[str, str]:
        """HTTP or TCP chain for this tunnel, and why: the port's declared protocol, else what
        the first bytes look like (Envoy's http_inspector). HTTP/2 and gRPC go to the TCP chain
        in the lab (its HTTP codec is HTTP/1.1 only; Istio parses them on the HTTP chain)."""
        declared = target.protocol
        if declared == protocol.HTTP:
            return protocol.HTTP, "the port is declared HTTP"
        if declared == protocol.TCP:
            return protocol.TCP, "the port is declared TCP"
        if declared in (protocol.HTTP2, protocol.GRPC):
            return protocol.TCP, (f"the port is declared {declared}; the lab's waypoint parses HTTP/1.1 only, so "
                                  "it forwards HTTP/2 as bytes (Istio would route it as HTTP)")
        sniffed = await protocol.sniff(reader)
        if sniffed == protocol.HTTP:
            return protocol.HTTP, "the port's protocol is not declared, and the first bytes are an HTTP/1.1 request"
        return protocol.TCP, ("the port's protocol is not declared, and the first bytes are not HTTP/1.1"
                              if reader.peek() else "the port's protocol is not declared, and the client sent "
                              "nothing first")

    def _source_peer(self, peer: TunnelPeer, baggage: str | None) -> Peer:
        """The client as Istio's metrics name it: identity from mTLS, workload from the
        `baggage` the source ztunnel put on the CONNECT."""
        b = parse_baggage(baggage) if baggage else Baggage()
        ident = peer.identity
        return Peer(workload=b.workload_name or UNKNOWN,
                    namespace=b.namespace or (ident.namespace if ident else UNKNOWN),
                    principal=ident.uri if ident else UNKNOWN, app=b.service_name or UNKNOWN,
                    version=b.service_version or UNKNOWN)

    async def serve_http(self, stream: HboneStream, target: Target, peer: TunnelPeer, trace: TraceContext,
                         client_addr: tuple[str, int], source: Peer, reader: HttpReader | None = None) -> None:
        """HTTP/1.1 keep-alive over one tunnel: request after request, until EOF, an error,
        or a `Connection: close`."""
        reader = reader or HttpReader(stream)
        opened = time.monotonic()

        async def send_continue() -> None:
            stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await stream.drain()

        while True:
            try:
                if not await reader.wait():  # an idle keep-alive connection is not request time
                    break
            except HboneError:
                break
            start = time.time()
            t0 = self.clock()
            try:
                req = await read_request(reader, on_continue=send_continue)
            except HttpError as e:
                await self._reject(stream, e, target, peer, trace, client_addr, source, start, t0)
                break
            except HboneError:
                break
            if req is None:
                break
            ex = self._exchange(target, peer, trace, req, client_addr, source, start, t0)
            ex.opened = opened
            try:
                await self.handle_request(stream, ex)
            except HboneError:
                ex.aborted = True
            if ex.aborted:  # the response was cut: reset the client's stream (RST_STREAM)
                stream.close()
                return
            if ex.close_after or not req.keep_alive:
                break
        with contextlib.suppress(HboneError):
            stream.write_eof()
            await self._delayed_close(reader)

    @staticmethod
    async def _delayed_close(reader: HttpReader) -> None:
        """Envoy's delayed close: the response is out (END_STREAM); give the client up to
        DELAYED_CLOSE_TIMEOUT to end its side, discarding what it still sends, so that closing
        the stream does not reset it before the client read the response."""
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, HboneError):
            async with asyncio.timeout(DELAYED_CLOSE_TIMEOUT):
                while await reader.read_some():
                    pass

    def _exchange(self, target: Target, peer: TunnelPeer, trace: TraceContext, req: HttpRequest,
                  client_addr: tuple[str, int], source: Peer, start: float, t0: float) -> Exchange:
        svc = target.service
        rec = RequestRecord(
            method=req.method, path=req.target, status=0, start_time=start, protocol=req.http_version,
            bytes_received=len(req.body), x_forwarded_for=get_header(req.headers, "x-forwarded-for") or "",
            user_agent=get_header(req.headers, "user-agent") or "",
            request_id=get_header(req.headers, "x-request-id") or "", authority=req.host,
            downstream_local=f"{target.ip}:{target.port}", downstream_remote=_fmt(client_addr),
            source=source, flow_id=trace.flow_id,
            destination_service=svc.hostname if svc else UNKNOWN,
            destination_service_name=svc.name if svc else UNKNOWN,
            destination_service_namespace=svc.namespace if svc else UNKNOWN)
        return Exchange(target, peer, trace, req, rec, t0, client_addr, source)

    async def _reject(self, stream: HboneStream, err: HttpError, target: Target, peer: TunnelPeer,
                      trace: TraceContext, client_addr: tuple[str, int], source: Peer, start: float,
                      t0: float) -> None:
        """400/413/431: a local reply with `Connection: close`, then this tunnel ends. What
        the HTTP/1 codec refused (details `http1.*`) carries Envoy's flag DPE in the log."""
        req = HttpRequest(method="-", target="-", http_version="HTTP/1.1", headers=[])
        ex = self._exchange(target, peer, trace, req, client_addr, source, start, t0)
        ex.record.response_code_details = err.details
        self.emit("waypoint.request",
                  f"waypoint {self.name} could not accept a request in the tunnel: {err}; it answers "
                  f"{err.status} and closes the connection", trace.flow_id, error=str(err), status=err.status)
        with contextlib.suppress(HboneError):
            await self._local(stream, ex, err.status, mhttp.status_codes.RESPONSES.get(err.status, ""),
                              details=err.details, close=True,
                              flags=DOWNSTREAM_PROTOCOL_ERROR_FLAG if err.details.startswith("http1.") else "-")

    # -- one request ------------------------------------------------------------------------
    async def handle_request(self, stream: HboneStream, ex: Exchange) -> None:
        """RBAC, route, filters, upstream (with retries and timeouts), response, telemetry."""
        cfg = self.config
        req = ex.request
        target = ex.target
        self.stats["downstream_rq_total"] += 1
        rq = routes.Request(method=req.method, path=req.target, headers=tuple(req.headers), authority=req.host)
        self.emit("waypoint.request",
                  f"waypoint {self.name} read {req.method} {req.target} (Host {req.host or '-'}) from "
                  f"{ex.record.source.principal if ex.peer.identity else 'a client without identity'} "
                  f"inside the tunnel", ex.flow, method=req.method, path=req.target, host=req.host,
                  http_version=req.http_version, headers=dict(req.headers), body_bytes=len(req.body))
        # Every request uses the current config: a policy or route change applies to the next
        # request of an open tunnel; a Service that left the waypoint gets 503 and the tunnel closes.
        current = self.resolve(target.ip, target.port)
        if cfg is None or current is None:
            await self._local(stream, ex, 503, NO_HEALTHY_UPSTREAM_BODY, flags=NO_HEALTHY_UPSTREAM_FLAG,
                              details="filter_chain_not_found", close=True)
            return
        target = ex.target = current
        if self.stepper.on:
            await self.hold(ex, "route", f"waypoint {self.name} will match {req.method} {req.target} against the "
                                         f"HTTPRoutes of {target.name} (path, headers, method) and pick a backend")

        # 1. The route. Envoy's connection manager resolves (and caches) the route before its
        # filters run, so even a request RBAC denies has a route and a cluster in the access log.
        if target.service is not None:
            svc = target.service
            client_ns = ex.peer.identity.namespace if ex.peer.identity else ""
            route_list = svc.routes_for(target.port, client_ns)
            route = routes.route_request(route_list, rq, svc.backend_ref(target.port), self.rng)
        else:
            assert target.pod is not None
            route = routes.RouteDecision(status=None, backend=routes.BackendRef(
                name=target.pod.pod, namespace=target.pod.namespace, port=target.port),
                route_name=routes.DEFAULT_ROUTE_NAME)
        ex.record.route_name = route.route_name
        backend = self._backend(target, route.backend) if route.backend is not None else None
        if backend is not None:
            ex.record.upstream_cluster = backend.cluster_name

        # 2. L7 AuthorizationPolicy (Envoy's RBAC filter, before the router)
        policies = cfg.policies_for(target.service)
        if self.stepper.on:
            who = ex.record.source.principal if ex.peer.identity else "a client without identity"
            await self.hold(ex, "authorization",
                            f"route {route.route_name or '(none)'} chose backend {route.backend or '(a local reply)'}; "
                            f"next waypoint {self.name} checks {len(policies)} L7 AuthorizationPolicy(ies) for "
                            f"{req.method} {req.target} from {who}: allowed, or 403")
        attrs = authz.Attributes(request=rq, source_ip=ex.peer.address[0], source_identity=ex.peer.identity,
                                 destination_ip=target.ip, destination_port=target.port)
        decision = authz.evaluate(policies, attrs)
        ex.record.policy = decision.reason
        self.stats["rbac_allowed" if decision.allowed else "rbac_denied"] += 1
        verdict = "allowed" if decision.allowed else "denied with 403"
        self.emit("waypoint.authz",
                  f"waypoint {self.name} checked {len(policies)} L7 AuthorizationPolicy(ies) for {req.method} "
                  f"{req.target}: {verdict} ({decision.reason})", ex.flow, allowed=decision.allowed,
                  policy=decision.policy, rule=decision.rule, reason=decision.reason, details=decision.details,
                  policies=[p.key for p in policies], shadow=list(decision.shadow), audit=list(decision.audit))
        if not decision.allowed:
            await self._local(stream, ex, authz.DENIED_STATUS, authz.DENIED_BODY, details=decision.details)
            return

        # 3. The router: answer locally (no route, redirect, bad backend) or pick the backend
        weights = [{"backend": str(b), "weight": b.weight} for b in route.matched.rule.backends] \
            if route.matched is not None else []
        if route.status is not None:
            outcome = f"the waypoint answers {route.status} itself ({route.details})"
        elif len(weights) > 1:
            outcome = f"backend {route.backend}, drawn by weight from " + ", ".join(
                f"{w['backend']}={w['weight']}" for w in weights)
        else:
            outcome = f"backend {route.backend}"
        if self.stepper.on:
            await self.hold(ex, "router", f"the policies allowed it; waypoint {self.name} will route {req.method} "
                                          f"{req.target} by route {route.route_name or '(none)'}: {outcome}")
        self.emit("waypoint.route",
                  f"waypoint {self.name} routed {req.method} {req.target} by route {route.route_name or '(none)'}: "
                  f"{outcome}", ex.flow, route=route.route_name, backend=str(route.backend or ""),
                  cluster=backend.cluster_name if backend else "", weights=weights, status=route.status,
                  flags=route.response_flags, message=route.message)
        if route.status is not None:
            extra = [("location", route.location)] if route.location else []
            await self._local(stream, ex, route.status, route.message, flags=route.response_flags,
                              details=route.details, headers=extra)
            return
        if backend is None:
            await self._local(stream, ex, 500, f"backend {route.backend} is not known", details="direct_response")
            return

        # 4. filters (header changes, rewrite, mirror)
        filtered = flt.apply_request_filters(rq, route.filters, matched_prefix=route.matched_prefix, rng=self.rng)
        for mirror in filtered.mirrors:
            self._start_mirror(mirror, filtered.request, req.body, ex)

        # 5. upstream, retries, timeouts
        self.stats["upstream_rq_total"] += 1
        try:
            async with asyncio.timeout(route.timeout):
                await self._forward(stream, ex, backend, route, filtered.request)
        except TimeoutError:
            self.stats["upstream_rq_timeout"] += 1
            if ex.head_sent:
                ex.record.response_flags = self._flags(ex.record.response_flags, TIMEOUT_FLAG)
                ex.record.response_code_details = "response_timeout"
                ex.aborted = True
                self._finish(ex)
            else:
                await self._local(stream, ex, 504, "upstream request timeout", flags=TIMEOUT_FLAG,
                                  details="response_timeout")

    def _backend(self, target: Target, ref: routes.BackendRef | None) -> Backend | None:
        """The cluster for a backendRef, or for a pod-addressed target (workload waypoints) the pod."""
        if target.pod is not None:
            key = ("pod", target.pod.ip, target.port)
            state = self.backends.get(key)
            if state is None:
                pod = target.pod
                b = Backend(namespace=pod.namespace, name=pod.pod, hostname=pod.pod, vip=pod.ip, port=target.port,
                            target_port=target.port, endpoints=[pod])
                state = self.backends[key] = BackendState(b, self.clock)
            return state.backend
        assert self.config is not None and ref is not None
        return self.config.backend(ref)

    def _state(self, backend: Backend) -> BackendState:
        key = backend.key if backend.key in self.backends else ("pod", backend.vip, backend.port)
        state = self.backends.get(key)
        if state is None:
            state = self.backends[backend.key] = BackendState(backend, self.clock)
        return state

    @staticmethod
    def _flags(current: str, *more: str) -> str:
        flags = {f for f in (current or "-").split(",") + list(more) if f and f != "-"}
        return ",".join(sorted(flags, key=lambda f: FLAG_ORDER.index(f) if f in FLAG_ORDER else len(FLAG_ORDER))) or "-"

    def _upstream_request(self, rq: routes.Request, body: bytes, ex: Exchange) -> bytes:
        """The request as the waypoint sends it to the pod: hop-by-hop headers gone, Host the
        (possibly rewritten) authority, x-request-id and x-forwarded-proto as Envoy adds them,
        the buffered body with a Content-Length."""
        headers = strip_hop_by_hop(rq.headers)
        headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "host")]
        headers.insert(0, ("host", rq.authority or ex.request.host or f"{ex.target.ip}:{ex.target.port}"))
        if get_header(headers, "x-forwarded-proto") is None:
            headers.append(("x-forwarded-proto", "http"))
        if get_header(headers, "x-request-id") is None:
            rid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            headers.append(("x-request-id", rid))
        ex.record.request_id = get_header(headers, "x-request-id") or ""
        if body or ex.request.method in ("POST", "PUT", "PATCH") or get_header(rq.headers, "content-length"):
            headers.append(("content-length", str(len(body))))
        return serialize_head(f"{rq.method} {rq.path} HTTP/1.1", headers) + body

    async def _forward(self, stream: HboneStream, ex: Exchange, backend: Backend, route: routes.RouteDecision,
                       rq: routes.Request) -> None:
        """Tries upstream until an answer that is not retried, then relays it to the client."""
        state = self._state(backend)
        retry = route.retry
        payload = self._upstream_request(rq, ex.request.body, ex)
        tried: list[str] = []
        retries = 0
        holding_retry = False
        attempt = Attempt()
        try:
            while True:
                attempt = await self._attempt(state, ex, payload, tried, retry.per_try_timeout)
                if holding_retry:
                    state.breaker.retry_done()
                    holding_retry = False
                outcome = attempt.outcome
                if attempt.failure in ("overflow", "no-healthy-upstream"):
                    break
                if not retry.should_retry(retries, outcome):
                    if retries and retry.retriable(outcome):
                        ex.record.response_flags = self._flags(ex.record.response_flags, RETRY_LIMIT_FLAG)
                        self.stats["upstream_rq_retry_limit_exceeded"] += 1
                    break
                if not state.breaker.try_retry():
                    self.stats["upstream_rq_retry_limit_exceeded"] += 1
                    self.emit("waypoint.breaker",
                              f"waypoint {self.name} did not retry: {backend.cluster_name} already has "
                              f"{state.breaker.settings.max_retries} retries in flight (maxRetries)", ex.flow,
                              cluster=backend.cluster_name, reason="max_retries", event="retry_overflow")
                    break
                holding_retry = True
                await self._discard(state, attempt, ex.request.method)
                delay = retry.backoff(retries, self.rng)
                retries += 1
                self.stats["upstream_rq_retry"] += 1
                what = f"got {outcome}" if isinstance(outcome, int) else f"failed ({outcome}: {attempt.detail})"
                self.emit("waypoint.retry",
                          f"waypoint {self.name}'s try {retries} to {attempt.endpoint.pod if attempt.endpoint else '?'} "
                          f"{what}; retry {retries} of {retry.attempts} in {delay * 1000:.0f} ms, preferring "
                          f"another endpoint", ex.flow, attempt=retries, outcome=outcome, detail=attempt.detail,
                          backoff_ms=round(delay * 1000, 1), endpoint=attempt.endpoint.address if attempt.endpoint else "")
                await asyncio.sleep(delay)
            ex.record.attempts = retries + 1
            if attempt.response is None:
                status, flag, details, body = UPSTREAM_FAILURES[attempt.failure]
                ex.record.upstream_failure = attempt.detail or "-"
                if attempt.endpoint is not None and attempt.failure not in ("overflow", "no-healthy-upstream"):
                    ex.record.upstream_host = attempt.endpoint.address  # the last host tried
                    ex.record.destination = self._destination(attempt.endpoint)
                if attempt.failure == "per-try-timeout":
                    self.stats["upstream_rq_per_try_timeout"] += 1
                await self._local(stream, ex, status, body, flags=flag, details=details)
                return
            await self._relay(stream, ex, state, attempt, route)
        finally:
            if holding_retry:
                state.breaker.retry_done()
            if not attempt.released and attempt.ticket is not None:
                self._done(state, attempt, keep_alive=False)

    async def _attempt(self, state: BackendState, ex: Exchange, payload: bytes, tried: list[str],
                       per_try_timeout: float | None) -> Attempt:
        """One try: outlier-healthy endpoint, breaker admission, a connection, the request out,
        the response head in."""
        backend = state.backend
        endpoints = state.available()
        if not endpoints:
            return Attempt(failure="no-healthy-upstream",
                           detail=f"{backend.cluster_name} has no healthy endpoint")
        ep = routes.pick_endpoint(endpoints, self.rng, policy=backend.policy.load_balancer, active=state.active,
                                  exclude=tried, round_robin=state.next_rr)
        assert ep is not None
        tried.append(ep.address)
        ticket = state.breaker.acquire()
        attempt = Attempt(endpoint=ep, ticket=ticket)
        if ticket.state == OVERFLOW:
            self.stats["upstream_rq_overflow"] += 1
            attempt.failure, attempt.detail = "overflow", ticket.reason
            attempt.released = True
            self.emit("waypoint.breaker",
                      f"waypoint {self.name}'s circuit breaker for {backend.cluster_name} is open: {ticket.reason}, "
                      f"so the request is refused with 503 UO", ex.flow, cluster=backend.cluster_name,
                      event="overflow", reason=ticket.reason, policy=backend.policy.source)
            return attempt
        try:
            return await self._try(state, ex, attempt, payload, per_try_timeout)
        except BaseException:  # cancelled (request timeout, client gone): give the slot back
            self._done(state, attempt, keep_alive=False)
            raise

    async def _try(self, state: BackendState, ex: Exchange, attempt: Attempt, payload: bytes,
                   per_try_timeout: float | None) -> Attempt:
        backend = state.backend
        ep, ticket = attempt.endpoint, attempt.ticket
        assert ep is not None and ticket is not None
        if ticket.state == PENDING:
            self.stats["upstream_rq_pending_total"] += 1
            self.emit("waypoint.breaker",
                      f"waypoint {self.name}: every connection to {backend.cluster_name} is busy and no new one "
                      f"is allowed, so the request waits (pending)", ex.flow, cluster=backend.cluster_name,
                      event="pending", pending=len(state.breaker.pending))
            await state.wait_pending(ticket)
        if self.stepper.on:
            await self.hold(ex, "tunnel out",
                            f"waypoint {self.name} will send {ex.request.method} {ex.request.target} to pod {ep.pod} "
                            f"({ep.address}) through HBONE, as its own identity {self.identity} (a new CONNECT to "
                            f"{ep.ip}:{HBONE_PORT}, or a kept-alive stream)")
        state.active[ep.address] = state.active.get(ep.address, 0) + 1
        try:
            async with asyncio.timeout(per_try_timeout):
                conn = await self._connection(state, ticket, ep, ex)
                attempt.conn = conn
                attempt.sent_at = self.clock()
                self._sent_to(ex, ep, conn)
                conn.tunnel.stream.write(payload)
                await conn.tunnel.stream.drain()
                conn.requests += 1
                attempt.response = await read_response_head(conn.reader)
                attempt.head_at = self.clock()
        except UpstreamConnectError as e:
            self.stats["upstream_cx_connect_fail"] += 1
            attempt.failure, attempt.detail = "connect-failure", str(e)
        except TimeoutError:
            attempt.failure, attempt.detail = "per-try-timeout", f"no response within {per_try_timeout:g}s"
        except (HboneError, ConnectionError, asyncio.IncompleteReadError) as e:
            self.stats["upstream_cx_destroy_remote"] += 1
            attempt.failure, attempt.detail = "reset", f"the backend closed or reset the stream: {e or type(e).__name__}"
        except ValueError as e:
            attempt.failure, attempt.detail = "protocol-error", f"bad response from the backend: {e}"
        if state.outlier is not None and state.outlier.record(ep.address, attempt.outcome):
            self.emit("waypoint.breaker",
                      f"waypoint {self.name}'s outlier detection ejected {ep.pod} ({ep.address}) from "
                      f"{backend.cluster_name} after consecutive errors", ex.flow, cluster=backend.cluster_name,
                      event="ejected", endpoint=ep.address, upstream_pod=ep.pod)
        if attempt.response is None:
            self._done(state, attempt, keep_alive=False)
        return attempt

    async def _connection(self, state: BackendState, ticket: Ticket, ep: Endpoint, ex: Exchange) -> UpstreamConn:
        """The upstream connection for a ticket: the kept-alive stream of that breaker connection
        if it goes to the chosen pod and is still open, else a new CONNECT stream."""
        assert ticket.state == ACTIVE and ticket.connection is not None
        conn = state.conns.get(ticket.connection)
        if conn is not None and (conn.endpoint.address != ep.address or not conn.usable()):
            conn.close()
            del state.conns[ticket.connection]
            conn = None
        if conn is not None:
            self.emit("waypoint.tunnel.out",
                      f"waypoint {self.name} sends the request to pod {ep.pod} ({ep.address}) on a kept-alive "
                      f"HBONE stream", ex.flow, upstream_pod=ep.pod, address=ep.address, identity=str(self.identity),
                      peer_identity=str(conn.tunnel.peer_identity or ""), reused=True,
                      new_connection=False, authority=ep.address)
            return conn
        svc = ex.target.service
        hbone = create_hbone_request(ep.ip, ep.port, src_ip=ex.client_addr[0], src_port=ex.client_addr[1],
                                     service_host=svc.hostname if svc else None, baggage=self._baggage(),
                                     trace_id=ex.flow)
        tunnel = await self.connector(ep, hbone)
        self.stats["upstream_cx_total"] += 1
        conn = UpstreamConn(ticket.connection, ep, tunnel, HttpReader(tunnel.stream))
        state.conns[ticket.connection] = conn
        how = "a new mTLS connection" if tunnel.new_connection else "a pooled mTLS connection"
        self.emit("waypoint.tunnel.out",
                  f"waypoint {self.name} opened an HBONE tunnel to pod {ep.pod} at {ep.ip}:{HBONE_PORT} "
                  f"(CONNECT {ep.address}) on {how}, presenting its own identity {self.identity}; the pod's "
                  f"certificate says {tunnel.peer_identity or '-'}", ex.flow, upstream_pod=ep.pod, address=ep.address,
                  identity=str(self.identity), peer_identity=str(tunnel.peer_identity or ""), reused=False,
                  new_connection=tunnel.new_connection, authority=hbone.authority, headers=dict(hbone.headers))
        return conn

    def _sent_to(self, ex: Exchange, ep: Endpoint, conn: UpstreamConn) -> None:
        """The request goes out to `ep`: from now on the access log names this upstream host
        (Envoy's UPSTREAM_HOST is that of the latest try, also when `timeouts.request` ends the
        request before any answer)."""
        ex.record.upstream_host = ep.address
        ex.record.upstream_local = conn.tunnel.local
        ex.record.destination = self._destination(ep)

    @staticmethod
    def _destination(ep: Endpoint) -> Peer:
        """The backend pod as Istio's metrics name the destination."""
        return Peer(workload=ep.workload or ep.pod, namespace=ep.namespace, principal=ep.identity.uri,
                    app=ep.app or UNKNOWN, version=ep.version or UNKNOWN, pod=ep.pod)

    def _baggage(self) -> Baggage:
        cfg = self.config
        if cfg is None:
            return Baggage(cluster_name=self.cluster)
        return Baggage(cluster_name=self.cluster, namespace=cfg.namespace, workload_kind="deployment",
                       workload_name=cfg.name, service_name=cfg.name, service_version="latest")

    def _done(self, state: BackendState, attempt: Attempt, keep_alive: bool) -> None:
        if attempt.released or attempt.ticket is None:
            attempt.released = True
            return
        attempt.released = True
        ep = attempt.endpoint
        if ep is not None and attempt.ticket.state == ACTIVE:
            n = state.active.get(ep.address, 1) - 1
            if n > 0:
                state.active[ep.address] = n
            else:
                state.active.pop(ep.address, None)
        if not keep_alive and attempt.conn is not None:
            attempt.conn.close()
        state.release(attempt.ticket, keep_alive)

    async def _discard(self, state: BackendState, attempt: Attempt, method: str) -> None:
        """Drop a response that is going to be retried; keep its connection if that is clean."""
        if attempt.response is None or attempt.conn is None:
            return
        keep = False
        try:
            size = attempt.response.body_size(method)
            if size is not None and size >= 0 and size <= FLOW_BODY_LIMIT:
                async for _ in response_body(attempt.conn.reader, size):
                    pass
                keep = not wants_close(attempt.response.http_version, attempt.response.headers)
        except (HboneError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            keep = False
        self._done(state, attempt, keep_alive=keep)

    async def _relay(self, stream: HboneStream, ex: Exchange, state: BackendState, attempt: Attempt,
                     route: routes.RouteDecision) -> None:
        """Stream the backend's response to the client: head (hop-by-hop headers gone, response
        filters applied, Envoy's own headers), then the body in the framing the client can read."""
        resp = attempt.response
        conn = attempt.conn
        ep = attempt.endpoint
        assert resp is not None and conn is not None and ep is not None
        rec = ex.record
        rec.status = resp.status
        rec.upstream_host = ep.address
        rec.upstream_local = conn.tunnel.local
        rec.upstream_service_time_ms = (attempt.head_at - attempt.sent_at) * 1000
        rec.destination = self._destination(ep)
        size = resp.body_size(ex.request.method)
        downstream_11 = ex.request.http_version == "HTTP/1.1"
        headers = strip_hop_by_hop(resp.headers)
        headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "server")]
        headers = flt.apply_response_filters(headers, route.filters)
        headers.append(("server", SERVER_HEADER))
        headers.append(("x-envoy-upstream-service-time", str(int(rec.upstream_service_time_ms))))
        chunked_out = False
        length = get_header(resp.headers, "content-length")
        if size is not None and size >= 0:
            if length is not None:  # also a HEAD answer's length, which describes the GET body
                headers.append(("content-length", length))
        elif downstream_11:
            headers.append(("transfer-encoding", "chunked"))
            chunked_out = True
        upstream_close = wants_close(resp.http_version, resp.headers) or (size is not None and size < 0)
        client_close = not ex.request.keep_alive or (not chunked_out and (size is None or size < 0))
        if client_close:
            headers.append(("connection", "close"))
            ex.close_after = True
        ex.response_headers = headers
        ex.response_reason = resp.reason
        stream.write(serialize_head(f"{ex.request.http_version} {resp.status} {resp.reason}".rstrip(), headers))
        ex.head_sent = True
        sent = 0
        try:
            async for piece in response_body(conn.reader, size):
                try:
                    stream.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked_out else piece)
                    await stream.drain()
                except HboneError:
                    rec.response_flags = self._flags(rec.response_flags, DOWNSTREAM_TERMINATION_FLAG)
                    rec.response_code_details = "downstream_remote_disconnect"
                    ex.aborted = True
                    self._done(state, attempt, keep_alive=False)
                    self._finish(ex)
                    return
                sent += len(piece)
                if len(ex.response_body) < FLOW_BODY_LIMIT:
                    ex.response_body += piece[:FLOW_BODY_LIMIT - len(ex.response_body)]
        except (HboneError, ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
            # The backend went away mid-response: the client already has the status line, so
            # Envoy can only reset the downstream stream (here: the CONNECT stream).
            self.stats["upstream_cx_destroy_remote"] += 1
            rec.bytes_sent = sent
            rec.response_flags = self._flags(rec.response_flags, "UC")
            rec.response_code_details = "upstream_reset_after_response_started{connection_termination}"
            rec.upstream_failure = str(e) or type(e).__name__
            ex.aborted = True
            self._done(state, attempt, keep_alive=False)
            self._finish(ex)
            return
        if chunked_out:
            stream.write(b"0\r\n\r\n")
        await stream.drain()
        rec.bytes_sent = sent
        self._done(state, attempt, keep_alive=not upstream_close)
        await asyncio.sleep(0)  # let the HTTP/2 sender put the response on the wire before the telemetry
        self._finish(ex)

    # -- mirror -----------------------------------------------------------------------------
    def _start_mirror(self, mirror: flt.MirrorTarget, rq: routes.Request, body: bytes, ex: Exchange) -> None:
        task = asyncio.get_running_loop().create_task(self._mirror(mirror, flt.mirror_request(rq), body, ex))
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _mirror(self, mirror: flt.MirrorTarget, rq: routes.Request, body: bytes, ex: Exchange) -> None:
        """Fire and forget (Envoy's request_mirror_policies): a copy to one endpoint of the
        mirror backend on a stream of its own; the answer is read and dropped."""
        self.stats["mirror_rq_total"] += 1
        cfg = self.config
        backend = cfg.backend(mirror.key) if cfg else None  # type: ignore[arg-type]
        ep = routes.pick_endpoint(backend.endpoints, self.rng) if backend else None
        status: int | str = "no endpoint"
        if ep is not None:
            try:
                hbone = create_hbone_request(ep.ip, ep.port, src_ip=ex.client_addr[0], src_port=ex.client_addr[1],
                                             service_host=backend.hostname if backend else None,
                                             baggage=self._baggage(), trace_id=ex.flow)
                tunnel = await asyncio.wait_for(self.connector(ep, hbone), 10)
                try:
                    headers = [(k, v) for k, v in strip_hop_by_hop(rq.headers)
                               if k.lower() not in ("host", "content-length")]
                    head = [("host", rq.authority), *headers, ("connection", "close")]
                    if body:
                        head.append(("content-length", str(len(body))))
                    tunnel.stream.write(serialize_head(f"{rq.method} {rq.path} HTTP/1.1", head) + body)
                    await tunnel.stream.drain()
                    resp = await asyncio.wait_for(read_response_head(HttpReader(tunnel.stream)), 10)
                    status = resp.status
                finally:
                    tunnel.stream.close()
            except (UpstreamConnectError, HboneError, OSError, ValueError, asyncio.TimeoutError,
                    asyncio.IncompleteReadError) as e:
                status = f"failed: {e or type(e).__name__}"
        if not isinstance(status, int):
            self.stats["mirror_rq_failed"] += 1
        self.emit("waypoint.mirror",
                  f"waypoint {self.name} mirrored {rq.method} {rq.path} to {mirror.namespace}/{mirror.name}"
                  f"{' (pod ' + ep.pod + ')' if ep else ''}, Host {rq.authority}; its answer ({status}) is ignored",
                  ex.flow, backend=f"{mirror.namespace}/{mirror.name}:{mirror.port}", status=status,
                  upstream_pod=ep.pod if ep else "")

    # -- answers and telemetry --------------------------------------------------------------
    async def _local(self, stream: HboneStream, ex: Exchange, status: int, body: str | bytes, *, flags: str = "-",
                     details: str = "", headers: Sequence[Header] = (), close: bool = False) -> None:
        """Answer the client from the waypoint itself (Envoy's local reply), then record it."""
        close = close or not ex.request.keep_alive
        head, hdrs, data = local_reply(status, body, close=close, headers=headers)
        if ex.request.method == "HEAD":
            data = b""
        rec = ex.record
        rec.status = status
        rec.response_flags = self._flags(rec.response_flags, flags)
        rec.response_code_details = details or rec.response_code_details
        rec.bytes_sent = len(data)
        ex.response_headers = hdrs
        ex.response_body = bytearray(data)
        ex.response_reason = mhttp.status_codes.RESPONSES.get(status, "")
        ex.close_after = close
        stream.write(head + data)
        ex.head_sent = True
        try:
            await stream.drain()
            await asyncio.sleep(0)  # the response goes out first, then the telemetry
        finally:
            self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        """The request is over: access log line, metrics, flow file, waypoint.response event."""
        rec = ex.record
        rec.duration_ms = (self.clock() - ex.t0) * 1000
        if rec.status:
            self.stats[f"downstream_rq_{rec.status // 100}xx"] = self.stats.get(f"downstream_rq_{rec.status // 100}xx",
                                                                                 0) + 1
        self.write_access_log(format_access_log(rec))
        self.metrics.record(rec)
        if self.flows is not None and ex.request.method != "-":
            try:
                self.flows.append(flow_state(
                    rec, request_headers=ex.request.headers, request_body=ex.request.body,
                    response_headers=ex.response_headers, response_body=bytes(ex.response_body),
                    response_reason=ex.response_reason, extra={"waypoint": self.name},
                    error=f"stream reset: {rec.response_code_details}" if ex.aborted else ""))
            except Exception:  # a broken flow file must not break the data path
                log.exception("writing the flow file failed")
        upstream = f" from pod {rec.destination.pod}" if rec.destination.pod else " (answered by the waypoint)"
        self.emit("waypoint.response",
                  f"waypoint {self.name} answered {rec.method} {rec.path} with {rec.status}{upstream} in "
                  f"{rec.duration_ms:.1f} ms" + (f", flags {rec.response_flags}" if rec.response_flags != "-" else "")
                  + (", then reset the stream" if ex.aborted else ""),
                  ex.flow, status=rec.status, duration_ms=round(rec.duration_ms, 3), flags=rec.response_flags,
                  details=rec.response_code_details, bytes_sent=rec.bytes_sent, upstream_host=rec.upstream_host,
                  upstream_pod=rec.destination.pod, route=rec.route_name, attempts=rec.attempts,
                  aborted=ex.aborted)

    async def close(self) -> None:
        """Stop: cancel mirrors, close upstream connections."""
        for task in list(self._mirrors):
            task.cancel()
        await asyncio.gather(*self._mirrors, return_exceptions=True)
        for state in self.backends.values():
            state.close()
        if self.flows is not None:
            self.flows.close()
