"""The inbound HBONE listener (15008): where peers' mTLS + HTTP/2 CONNECT tunnels arrive.

Real counterpart: zt:src/proxy/inbound.rs (``Inbound``, ``validate_destination``,
``build_response``), zt:src/tls/workload.rs (``InboundAcceptor``, ``TrustDomainVerifier``).

Port 15008 is the one inbound TCP port the in-pod rules do NOT redirect: peers' ztunnels (and
waypoints) connect to ``podIP:15008`` directly, and ztunnel's listener inside the pod accepts.

One accepted TCP connection is a *tunnel* (`serve_tunnel`):

1. ``tls.certificate``: ztunnel looks up pod B's Workload and presents **B's** certificate (its
   SPIFFE identity), never its own. A client certificate is required and must chain to the mesh
   root; then its trust domain must be B's own (``TrustDomainVerifier``).
2. ``tls.handshake``: both identities, the cipher, ALPN h2 (a client that did not negotiate h2 is
   refused). Then HTTP/2 (lab.hbone.serve_hbone).

Each CONNECT stream on it is one *connection* (`Tunnel.handle_stream`, ``conn.captured`` with
port 15008), with the flow id the source sent in ``traceparent``:

3. ``hbone.connect.received`` with its headers. The ``:authority`` IP must be the pod's own IP,
   the address the tunnel arrived on (else 400, "ip mismatch"); a CONNECT to one of ztunnel's own
   ports is answered 503 ("attempted recursive call to ourselves").
4. ``rbac.decision``: L4 authorization with (source IP, source identity from the certificate,
   pod IP, application port from the authority) over the pod's policies: deny -> 401,
   "connection closed due to policy rejection: ...".
5. ``conn.upstream``: connect to the app from inside pod B with ``IP_TRANSPARENT`` + mark 1337,
   bound to the client's IP (the app sees the real client); failure -> 503.
6. ``hbone.response`` 200 (with ``baggage`` describing B), then bytes both ways until both ends
   closed; ``conn.closed`` and one ``direction="inbound"`` access-log line.

In step mode (lab/ztunnel/stepper.py) a new CONNECT waits before step 4 and before step 5.

Streams the HTTP/2 server answers by itself (not a CONNECT to an ``ip:port`` -> 400, headers
too large -> 431, over the 100 concurrent streams -> REFUSED_STREAM) are logged as failed
connections too (`Tunnel.on_reject`); a flood of refused streams gets one line, plus a count
when the tunnel ends.

Without a control plane (no ``--xds-address``) the listener is still real, so the port is owned by
ztunnel and visible in ``ss -tlnp``, but every connection is closed at once (`handle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

from lab.hbone import ConnectRequest, HboneError, RejectedStream, serve_hbone, wire
from lab.hbone import copy_bidirectional as hbone_copy
from lab.hbone.headers import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_SERVICE_UNAVAILABLE,
    STATUS_UNAUTHORIZED,
    TraceparentError,
    format_baggage,
    parse_forwarded,
    parse_traceparent,
)
from lab.tls.certificate import NoPeerIdentity, WorkloadCertificate
from lab.tls.contexts import ALPN_H2, PeerVerificationError, verify_client_trust_domain
from lab.tls.identity import Identity
from lab.ztunnel.identity_manager import CertificateUnavailable
from lab.ztunnel.proxy import (
    COPY_CHUNK,
    POLICY_REJECTION,
    READER_LIMIT,
    Flow,
    HboneNotServed,
    ProxyInputs,
    SelfCall,
    UnknownWorkload,
    io_error,
    reset,
)
from lab.ztunnel.proxy.inbound_passthrough import emit_rbac
from lab.ztunnel.proxy.outbound import baggage_of
from lab.ztunnel.rbac import Connection
from lab.ztunnel.socket import Addr, format_addr, upstream_socket
from lab.ztunnel.state import Workload

log = logging.getLogger("ztunnel.proxy.inbound")


async def handle(flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """No control plane: accept a connection on 15008 and close it (no certificate to present)."""
    flow.captured(f"from {format_addr(flow.src)} on pod {flow.pi.workload.name}'s HBONE port")
    flow.original_dst(flow.local, f"{format_addr(flow.src)} connected to {format_addr(flow.local)}: port "
                                  f"15008 is never redirected, so this is the real destination")
    raise HboneNotServed()


# ------------------------------------------------------------------------------------ pure parts
def validate_destination(local_ip: str, authority: Addr) -> str | None:
    """zt ``validate_destination``: the CONNECT must name the pod the tunnel arrived at. Returns
    the error ("ip mismatch: <tunnel dst> != <authority>") or None (pure)."""
    if authority[0] != local_ip:
        return f"ip mismatch: {local_ip} != {authority[0]}"
    return None


def guess_inbound_service(workload: Workload, forwarded_host: str | None, port: int) -> str | None:
    """zt ``guess_inbound_service``: the service the client addressed, from the ``forwarded``
    header's ``host=`` when the pod backs that service, else the pod's first service with a port
    mapped to `port` (pure)."""
    hostnames = {key.split("/", 1)[1]: ports for key, ports in sorted(workload.services.items()) if "/" in key}
    if forwarded_host and forwarded_host in hostnames:
        return forwarded_host
    for hostname, ports in hostnames.items():
        if port in ports.values():
            return hostname
    return None


def trace_id_of(request: ConnectRequest) -> str | None:
    """The flow id the source put in the CONNECT's ``traceparent`` (None if absent or invalid)."""
    value = request.get("traceparent")
    if not value:
        return None
    try:
        return parse_traceparent(value).trace_id
    except TraceparentError:
        return None


# ------------------------------------------------------------------------------------ the tunnel
async def _tls_accept(sock: socket.socket, ctx: ssl.SSLContext,
                      timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Server-side TLS on an accepted socket, as asyncio streams whose bytes go straight to HTTP/2."""
    return await wire.accept_connection(sock, ssl=ctx, ssl_handshake_timeout=timeout)


class Tunnel:
    """One accepted mTLS + HTTP/2 connection on a pod's port 15008 and the streams it carries."""

    def __init__(self, pi: ProxyInputs, peer: Addr, local: Addr, workload: Workload, cert: WorkloadCertificate,
                 client_identity: Identity, ssl_object: ssl.SSLObject) -> None:
        self.pi = pi
        self.peer = peer
        self.local = local
        self.workload = workload
        self.cert = cert
        self.client_identity = client_identity
        cipher = ssl_object.cipher()
        self.tls = dict(cipher=cipher[0] if cipher else "", tls_version=ssl_object.version() or "",
                        alpn=ssl_object.selected_alpn_protocol() or "")
        self.streams = 0
        self.refused = 0  # streams refused over the concurrent-stream limit

    def _tls_events(self, flow: Flow, stream_id: int) -> None:
        w, node = self.workload, self.pi.cfg.node
        flow.emit("tls.certificate",
                  f"ztunnel on {node} presented pod {w.name}'s own certificate ({w.identity}, serial "
                  f"{self.cert.serial[:16]}) on port 15008: the DESTINATION workload's identity, never ztunnel's",
                  identity=str(w.identity), serial=self.cert.serial, not_after=self.cert.not_after.isoformat(),
                  role="server")
        fields = dict(src_identity=str(self.client_identity), dst_identity=str(w.identity), **self.tls,
                      reused=self.streams > 1, local=format_addr(self.local), remote=format_addr(self.peer),
                      stream_id=stream_id)
        if self.streams == 1:
            flow.emit("tls.handshake",
                      f"mTLS accepted from {format_addr(self.peer)}: the client presented {self.client_identity} "
                      f"(trust domain {self.client_identity.trust_domain}, the pod's own: accepted), ztunnel "
                      f"presented {w.identity}; {self.tls['tls_version']} {self.tls['cipher']}, ALPN "
                      f"{self.tls['alpn']}", **fields)
        else:
            flow.emit("tls.handshake",
                      f"this connection arrived as HTTP/2 stream {stream_id} of an existing mTLS connection from "
                      f"{format_addr(self.peer)} ({self.client_identity} -> {w.identity}, {self.tls['cipher']})",
                      **fields)

    async def handle_stream(self, request: ConnectRequest, respond) -> None:  # type: ignore[no-untyped-def]
        """One CONNECT: validate, authorize, connect to the app, answer, copy (module docstring)."""
        pi = self.pi
        mesh = pi.mesh
        assert mesh is not None
        self.streams += 1
        flow = Flow(pi, "inbound", pi.cfg.inbound_port, self.peer, self.local, flow_id=trace_id_of(request))
        task = asyncio.current_task()
        assert task is not None
        pi.connections.register(flow, task)
        workload = mesh.state.workloads.get(self.workload.uid, self.workload)
        flow.mtls = True
        flow.src_identity, flow.dst_identity = self.client_identity, workload.identity
        flow.dst_workload = workload
        flow.src_workload = mesh.state.workload_by_ip(self.peer[0])
        flow.info.protocol = "HBONE"
        up_writer: asyncio.StreamWriter | None = None
        clean = False
        try:
            flow.captured(f"from {format_addr(self.peer)} as HTTP/2 stream {request.stream_id} of an mTLS connection, "
                          f"on pod {flow.pod}'s HBONE port (never redirected),")
            self._tls_events(flow, request.stream_id)
            target = request.destination
            flow.target = flow.hbone_addr = target
            flow.info.target = format_addr(target)
            forwarded = parse_forwarded(request.get("forwarded") or "")
            flow.dst_service = guess_inbound_service(workload, forwarded.host, target[1])
            headers = {k: v for k, v in request.headers if not k.startswith(":")}
            flow.emit("hbone.connect.received",
                      f"ztunnel on {pi.cfg.node} received CONNECT {request.authority} on stream "
                      f"{request.stream_id} from {self.client_identity} ({format_addr(self.peer)}) at pod "
                      f"{flow.pod}'s port 15008", authority=request.authority, headers=headers,
                      stream_id=request.stream_id, forwarded_for=forwarded.for_addr or "")
            mismatch = validate_destination(self.local[0], target)
            if mismatch is not None:
                await self._refuse(flow, respond, STATUS_BAD_REQUEST, mismatch)
                return
            if target[1] in pi.cfg.illegal_ports:  # zt find_inbound_upstream: Error::SelfCall -> 503
                await self._refuse(flow, respond, STATUS_SERVICE_UNAVAILABLE, str(SelfCall()))
                return
            flow.open()
            ctx = Connection(src_ip=self.peer[0], src_identity=self.client_identity, dst_ip=target[0],
                             dst_port=target[1])
            if pi.stepper.on:
                await flow.hold("authorization",
                                f"ztunnel on {pi.cfg.node} will check pod {flow.pod}'s AuthorizationPolicies for "
                                f"{self.client_identity} ({self.peer[0]}) -> port {target[1]}: allowed, or the "
                                f"CONNECT is answered 401")
                workload = mesh.state.workloads.get(self.workload.uid, workload)  # policies may have changed
            decision = mesh.authorize(workload, ctx)
            emit_rbac(flow, decision, ctx)
            if not decision.allowed:
                flow.response_flags = "DENY"
                await self._refuse(flow, respond, STATUS_UNAUTHORIZED, POLICY_REJECTION.format(reason=decision.reason))
                return
            pi.connections.track_rbac(flow, ctx)

            client_ip = self.peer[0]
            if pi.stepper.on:
                await flow.hold("upstream",
                                f"ztunnel will connect to the app at {format_addr(target)} inside pod {flow.pod} "
                                f"from the client's own address {client_ip} (IP_TRANSPARENT), then answer the "
                                f"CONNECT with 200")
            sock = pi.netns.run(lambda: upstream_socket(mark=pi.cfg.packet_mark, bind_source=client_ip))
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), pi.cfg.connect_timeout)
            except (OSError, TimeoutError) as e:
                sock.close()
                flow.response_flags = "CONNECT"
                await self._refuse(flow, respond, STATUS_SERVICE_UNAVAILABLE, io_error(e))
                return
            local = sock.getsockname()[:2]
            flow.connected(target, local,
                           f"ztunnel connected to the app at {format_addr(target)} inside pod {flow.pod} using the "
                           f"client's address {client_ip} as its source (IP_TRANSPARENT, mark "
                           f"{pi.cfg.packet_mark}), so the app sees the real client", protocol="HBONE",
                           transparent=True)
            up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=READER_LIMIT)
            stream = await respond(STATUS_OK, [("baggage", format_baggage(baggage_of(workload)))])
            flow.stream = stream
            flow.emit("hbone.response",
                      f"ztunnel answered the CONNECT with 200: bytes now flow between {self.client_identity} and "
                      f"the app at {format_addr(target)}", status=STATUS_OK)
            await hbone_copy(stream, up_reader, up_writer, chunk=COPY_CHUNK)
            flow.finish()
            clean = True
        except asyncio.CancelledError:
            flow.finish(flow.closing or "connection closed: the HBONE connection carrying it ended")
            raise
        except HboneError as e:
            flow.finish(str(e))
        except OSError as e:
            flow.finish(io_error(e))
        finally:
            pi.connections.release(flow)
            if up_writer is not None:
                if clean:
                    up_writer.close()
                else:
                    reset(up_writer)

    def on_reject(self, rejected: RejectedStream) -> None:
        """A stream the HTTP/2 server answered by itself (lab.hbone.RejectedStream): one failed
        connection in the log and events. Over the stream limit only the first refusal of a tunnel
        is logged here (a flood would flood the log); `serve_tunnel` logs the total at the end."""
        if rejected.status == 0:
            self.refused += 1
            if self.refused > 1:
                return
        flow = Flow(self.pi, "inbound", self.pi.cfg.inbound_port, self.peer, self.local)
        flow.mtls = True
        flow.src_identity, flow.dst_identity = self.client_identity, self.workload.identity
        flow.captured(f"from {format_addr(self.peer)} as HTTP/2 stream {rejected.stream_id} of an mTLS connection "
                      f"({self.client_identity}), on pod {flow.pod}'s HBONE port (never redirected),")
        error = rejected.reason if rejected.status == 0 else f"bad request ({rejected.status}): {rejected.reason}"
        flow.emit("hbone.response", f"ztunnel's HTTP/2 server answered stream {rejected.stream_id} by itself: {error}",
                  status=rejected.status, error=error, stream_id=rejected.stream_id,
                  headers={k: v for k, v in rejected.headers})
        flow.finish(error)

    async def _refuse(self, flow: Flow, respond, status: int, error: str) -> None:  # type: ignore[no-untyped-def]
        """Answer a non-200 status, then record the failure."""
        with contextlib.suppress(HboneError):
            await respond(status)
        flow.emit("hbone.response", f"ztunnel answered the CONNECT with {status}: {error}", status=status,
                  error=error)
        flow.finish(error)


async def serve_tunnel(pi: ProxyInputs, sock: socket.socket) -> None:
    """One accepted TCP connection on 15008: TLS as the pod's workload, then HTTP/2 CONNECT streams."""
    mesh = pi.mesh
    assert mesh is not None
    task = asyncio.current_task()
    assert task is not None
    pi.connections.register_tunnel(pi.workload.uid, task)
    peer: Addr = sock.getpeername()[:2]
    local: Addr = sock.getsockname()[:2]
    writer: asyncio.StreamWriter | None = None
    error: str | None = None
    try:
        workload = await mesh.workload_of(pi.workload, pi.cfg.workload_wait)
        if workload is None:
            raise UnknownWorkload("destination", pi.workload, pi.cfg.workload_wait)
        cert = await mesh.identities.get(workload.identity)
        try:
            _, writer = reader_writer = await _tls_accept(sock, mesh.tls.server(cert), pi.cfg.connect_timeout)
        except ssl.SSLError as e:
            raise _TunnelError(f"tls handshake error: {e.reason or e}") from e
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object.selected_alpn_protocol() != ALPN_H2:  # rustls would end the handshake here
            raise _TunnelError(f"tls handshake error: the client did not negotiate ALPN {ALPN_H2} "
                               f"(got {ssl_object.selected_alpn_protocol()!r}): HBONE is HTTP/2 only")
        try:
            client = verify_client_trust_domain(ssl_object, workload.trust_domain)
        except (PeerVerificationError, NoPeerIdentity) as e:
            raise _TunnelError(f"tls handshake error: {e}") from e
        tunnel = Tunnel(pi, peer, local, workload, cert, client, ssl_object)
        await serve_hbone(*reader_writer, tunnel.handle_stream, max_streams=pi.cfg.pool_max_streams,
                          on_reject=tunnel.on_reject)
        if tunnel.refused > 1:
            log.warning("HBONE connection from %s (%s) to pod %s ended; %d of its streams were refused "
                        "(REFUSED_STREAM): more than %d at once", format_addr(peer), client, pi.workload.key,
                        tunnel.refused, pi.cfg.pool_max_streams)
    except asyncio.CancelledError:
        if writer is not None:
            writer.transport.abort()
        raise
    except (_TunnelError, UnknownWorkload, CertificateUnavailable) as e:
        error = str(e)
    except (OSError, TimeoutError) as e:
        error = f"tls handshake error: {io_error(e)}"
    finally:
        pi.connections.release_tunnel(task)
        if writer is not None and error is not None:
            writer.transport.abort()
        elif writer is None:
            sock.close()
    if error is not None:
        flow = Flow(pi, "inbound", pi.cfg.inbound_port, peer, local)
        flow.captured(f"from {format_addr(peer)} on pod {pi.workload.name}'s HBONE port")
        flow.finish(error)


class _TunnelError(Exception):
    """The tunnel could not be set up (TLS or the peer's identity)."""
