"""The waypoint's TCP chain: Envoy's `tcp_proxy` for a Service port that is not HTTP.

istiod gives each TCP port a waypoint serves (a port named `tcp-*`, `redis`, `mongo`..., an
`appProtocol: tcp`, or an unnamed port whose first bytes are not HTTP) a filter chain with
`tcp_proxy` to the cluster `inbound-vip|<port>|tcp|<hostname>` (is:pilot/pkg/networking/core/
listener_waypoint.go `buildWaypointInternal`, its `tcpChain`). The waypoint then works at L4
only: it picks one endpoint of the Service, opens a new HBONE tunnel to that pod with its own
identity (connect_originate, as for HTTP) and copies bytes both ways until both sides end. No
route, retry or HTTP policy applies: HTTPRoutes only bind HTTP ports.

Lab simplifications, said where a learner would notice: the lab does not run Envoy's network
RBAC filter on this chain (an L4 AuthorizationPolicy with `targetRefs` to the Service is not
enforced here; the destination ztunnel's L4 policy still is), TCPRoute traffic shifting is not
read, and HTTP/2 and gRPC ports (which Istio serves on the HTTP chain) are forwarded on this
TCP chain too, because the lab's waypoint parses HTTP/1.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from lab.hbone import HboneError, HboneStream
from lab.hbone.headers import create_hbone_request
from lab.waypoint import routes
from lab.waypoint.config import Backend
from lab.waypoint.telemetry import Peer, RequestRecord, TraceContext, format_access_log

if TYPE_CHECKING:
    from lab.waypoint.http1 import HttpReader
    from lab.waypoint.proxy import Target, TunnelPeer, WaypointProxy

COPY_CHUNK = 64 * 1024


def tcp_cluster_name(backend: Backend) -> str:
    """Envoy's name of the TCP cluster in the waypoint (cluster_waypoint.go)."""
    return f"inbound-vip|{backend.port}|tcp|{backend.hostname}"


async def relay(down: HboneStream, first: bytes, up: HboneStream) -> tuple[int, int]:
    """Copy both ways between two HBONE streams; each direction ends with END_STREAM on the
    other side (a TCP half-close), never a reset. Returns (client -> pod, pod -> client) bytes."""
    counts = [len(first), 0]

    async def pump(src: HboneStream, dst: HboneStream, i: int) -> None:
        while data := await src.read(COPY_CHUNK):
            counts[i] += len(data)
            dst.write(data)
            await dst.drain()
        dst.write_eof()
        await dst.wait_sent()

    if first:
        up.write(first)
    try:
        await asyncio.gather(pump(down, up, 0), pump(up, down, 1))
    except (HboneError, ConnectionError):
        down.close()
        up.close()
        raise
    return counts[0], counts[1]


async def serve_tcp(proxy: WaypointProxy, stream: HboneStream, reader: HttpReader, target: Target,
                    peer: TunnelPeer, trace: TraceContext, client_addr: tuple[str, int], source: Peer,
                    why: str) -> None:
    """One CONNECT stream on the TCP chain: an endpoint, a tunnel to it, bytes both ways."""
    t0, start = time.monotonic(), time.time()
    svc = target.service
    backend = proxy._backend(target, svc.backend_ref(target.port) if svc else None)
    rec = RequestRecord(method="-", path="-", status=0, start_time=start, protocol="-", response_code_details="-",
                        downstream_local=f"{target.ip}:{target.port}", downstream_remote=f"{client_addr[0]}:"
                        f"{client_addr[1]}", source=source, flow_id=trace.flow_id,
                        destination_service=svc.hostname if svc else "unknown")
    state = proxy._state(backend) if backend is not None else None
    endpoints = state.available() if state is not None else []
    if backend is None or state is None or not endpoints:
        rec.response_flags = "UH"
        proxy.emit("waypoint.tcp", f"waypoint {proxy.name} has no healthy endpoint for {target.name} port "
                   f"{target.port}: it closes the TCP connection (UH)", trace.flow_id, target=target.name)
        proxy.write_access_log(format_access_log(rec))
        stream.close()
        return
    rec.upstream_cluster = tcp_cluster_name(backend)
    ep = routes.pick_endpoint(endpoints, proxy.rng, policy=backend.policy.load_balancer, active=state.active,
                              round_robin=state.next_rr)
    assert ep is not None
    proxy.emit("waypoint.tcp",
               f"waypoint {proxy.name} serves {target.name} port {target.port} on its TCP chain ({why}): no HTTP "
               f"parsing, no route or L7 policy; it forwards the bytes to pod {ep.pod} ({ep.address})",
               trace.flow_id, target=target.name, port=target.port, reason=why, upstream_pod=ep.pod,
               cluster=rec.upstream_cluster)
    hbone = create_hbone_request(ep.ip, ep.port, src_ip=client_addr[0], src_port=client_addr[1],
                                 service_host=svc.hostname if svc else None, baggage=proxy._baggage(),
                                 trace_id=trace.flow_id)
    from lab.waypoint.proxy import UpstreamConnectError

    try:
        tunnel = await proxy.connector(ep, hbone)
    except UpstreamConnectError as e:
        proxy.stats["upstream_cx_connect_fail"] += 1
        rec.response_flags, rec.upstream_failure, rec.upstream_host = "UF", str(e), ep.address
        proxy.emit("waypoint.tcp", f"waypoint {proxy.name} could not open a tunnel to pod {ep.pod}: {e}; it closes "
                   "the client's connection (UF)", trace.flow_id, error=str(e))
        proxy.write_access_log(format_access_log(rec))
        stream.close()
        return
    proxy.stats["upstream_cx_total"] += 1
    rec.upstream_host, rec.upstream_local = ep.address, tunnel.local
    rec.destination = proxy._destination(ep)
    proxy.emit("waypoint.tunnel.out",
               f"waypoint {proxy.name} opened an HBONE tunnel to pod {ep.pod} at {tunnel.remote} (CONNECT "
               f"{ep.address}), presenting its own identity {proxy.identity}", trace.flow_id, upstream_pod=ep.pod,
               address=ep.address, identity=str(proxy.identity), peer_identity=str(tunnel.peer_identity or ""),
               new_connection=tunnel.new_connection, authority=hbone.authority)
    try:
        rec.bytes_received, rec.bytes_sent = await relay(stream, reader.take_buffered(), tunnel.stream)
    except (HboneError, ConnectionError) as e:
        rec.connection_termination = f"reset: {e}"
    finally:
        rec.duration_ms = (time.monotonic() - t0) * 1000
        proxy.write_access_log(format_access_log(rec))
        proxy.emit("waypoint.tcp", f"waypoint {proxy.name} closed the TCP connection to pod {ep.pod} after "
                   f"{rec.duration_ms:.1f} ms: {rec.bytes_received} bytes in, {rec.bytes_sent} bytes out",
                   trace.flow_id, bytes_received=rec.bytes_received, bytes_sent=rec.bytes_sent)
        with contextlib.suppress(HboneError):
            tunnel.stream.close()
