"""The outbound listener (15001): the app's own outgoing TCP, captured in its pod.

Real counterpart: zt:src/proxy/outbound.rs (``Outbound``, ``OutboundConnection::proxy_to``,
``proxy_to_hbone``, ``create_hbone_request``).

The path of one connection, as the events show it:

1. ``conn.captured``: the app in pod A connects to, say, 10.244.2.7:9080. The pod's nat OUTPUT
   rule REDIRECTs the SYN to 127.0.0.1:15001, where ztunnel's listener (made inside pod A)
   accepts it.
2. ``conn.original_dst``: ``SO_ORIGINAL_DST`` gives back 10.244.2.7:9080.
3. ``conn.plan``: ztunnel finds pod A's own Workload in its xDS state (waiting up to 5 s for it)
   and decides with ``decision.build_request``: HBONE, plain TCP, passthrough, or an error.
4. Plain TCP / passthrough: ztunnel connects from INSIDE pod A's netns with ``SO_MARK`` 1337 (the
   pod's rules skip marked packets, so the connection leaves with the pod's own IP) and copies
   bytes (``conn.upstream``).
5. HBONE: ``tls.certificate`` (pod A's identity, never ztunnel's own); a pooled tunnel to
   ``podIP:15008`` (``tls.handshake``: TCP from pod A's netns, TLS 1.3, ALPN h2, the server must
   present exactly the expected identity); ``hbone.connect.sent``: ``CONNECT podIP:targetPort``
   with ``baggage``, ``forwarded`` and ``traceparent`` (its trace id is this flow's id, so the
   destination's events share it); ``hbone.response``: 200 -> copy bytes both ways; 401/503 or
   any error -> the app's connection is reset (RST), as Istio does.
6. ``conn.closed`` / ``conn.failed`` and one access-log line (``direction="outbound"``).

Without a control plane (no ``--xds-address``) ztunnel knows no workload: every destination takes
the passthrough branch.

Step mode (the lab's mesh debugger, lab/ztunnel/stepper.py): a new connection waits before the
plan, before the mTLS handshake, before the CONNECT and before a plain-TCP upstream connect, until
the learner releases it (``Flow.hold``); with step mode off each of these costs one boolean check.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Set as AbstractSet
from typing import Any

from lab.common.seams import SeamError
from lab.hbone import HboneConnection, HboneHttpError
from lab.hbone import copy_bidirectional as hbone_copy
from lab.hbone.headers import Baggage, HboneRequest, create_hbone_request, header_value
from lab.ztunnel.config import ILLEGAL_PORTS
from lab.ztunnel.identity_manager import CertificateUnavailable
from lab.ztunnel.metrics import FLAG_CONNECT
from lab.ztunnel.proxy import (
    COPY_CHUNK,
    READER_LIMIT,
    Flow,
    NoOriginalDst,
    ProxyError,
    SelfCall,
    UnknownWorkload,
)
from lab.ztunnel.proxy.decision import Failure, Hbone, Passthrough, Plan, build_request
from lab.ztunnel.proxy.pool import WorkloadKey
from lab.ztunnel.proxy.relay import copy_bidirectional
from lab.ztunnel.socket import Addr, format_addr, orig_dst_addr, upstream_socket
from lab.ztunnel.state import Workload

#: Reason phrases of the statuses an HBONE server answers (ztunnel prints "http status: 401 Unauthorized").
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 431:
           "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable"}


def check_target(target: Addr, *, illegal_ports: AbstractSet[int] = ILLEGAL_PORTS) -> Addr:
    """Refuse a LOOPBACK destination on one of ztunnel's own ports (pure): connecting there from
    inside the pod would land in ztunnel again (zt `proxy_to`: `dest_addr.ip().is_loopback()`).
    Raises :class:`SelfCall`. Another pod's 15008 is planned and sent as usual: that pod's
    ztunnel refuses it (503)."""
    if target[1] in illegal_ports and ipaddress.ip_address(target[0]).is_loopback:
        raise SelfCall()
    return target


def http_status_error(status: int) -> str:
    """ztunnel's ``Error::HttpStatus`` text, e.g. ``http status: 401 Unauthorized``."""
    return f"http status: {status} {REASONS.get(status, '')}".rstrip()


def baggage_of(w: Workload) -> Baggage:
    """The ``baggage`` ztunnel sends for a workload (zt:src/baggage.rs)."""
    kind = (w.workload_type or "pod").lower()
    return Baggage(cluster_name=w.cluster_id or None, namespace=w.namespace, workload_kind=kind,
                   workload_name=w.workload_name or w.name, service_name=w.canonical_name or None,
                   service_version=w.canonical_revision or None)


def passthrough_without_mesh(target: Addr) -> Passthrough:
    """The plan when ztunnel has no control plane: it knows no workload, so everything passes through."""
    return Passthrough(original_dst=target, reason=(
        f"this ztunnel has no xDS config (no istiod), so it knows no workload or service: it passes the "
        f"connection through as plain TCP to {format_addr(target)}"))


async def handle(flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Proxy one connection accepted on 15001 (the steps in the module docstring)."""
    pi = flow.pi
    pod = pi.workload.name
    flow.captured(f"redirected from pod {pod}")
    if flow.sock is None:
        raise ProxyError("no socket")
    try:
        target = orig_dst_addr(flow.sock)
    except OSError as e:
        raise NoOriginalDst(e) from e
    flow.original_dst(target, f"the app in pod {pod} wanted to reach {format_addr(target)} "
                              f"(SO_ORIGINAL_DST: the destination before the REDIRECT to 15001)")
    check_target(target, illegal_ports=pi.cfg.illegal_ports)
    if pi.stepper.on:
        await flow.hold("plan", f"ztunnel on {flow.node} will look up pod {pod}'s own workload and "
                                f"{format_addr(target)} in its xDS state (workloads, services) and decide how to "
                                f"get there: HBONE through an mTLS tunnel, plain TCP, or passthrough")

    mesh = pi.mesh
    if mesh is None:
        plan: Plan = passthrough_without_mesh(target)
    else:
        source = await mesh.workload_of(pi.workload, pi.cfg.workload_wait)
        if source is None:
            raise UnknownWorkload("source", pi.workload, pi.cfg.workload_wait)
        flow.src_workload = source
        decide = build_request  # a learner's, while the outbound decision exercise runs (lab/common/seams.py)
        if mesh.seams is not None:
            decide = mesh.seams.get("ztunnel.build_request", decide,
                                    check=lambda v: None if isinstance(v, Plan) else "expected a Plan")
        try:
            plan = decide(mesh.state, source, target, mesh.rng)
        except SeamError as e:
            raise ProxyError(str(e)) from e
    flow.dst_workload = plan.actual_destination_workload
    flow.dst_service = plan.destination_service.hostname if plan.destination_service else None
    flow.emit("conn.plan", f"ztunnel on {flow.node} decided: {plan.reason}", **plan.event_fields())
    if isinstance(plan, Failure):
        raise ProxyError(f"{plan.error}: {format_addr(target)}")
    if isinstance(plan, Hbone):
        await proxy_to_hbone(flow, plan, reader, writer)
    else:
        await proxy_to_tcp(flow, plan, reader, writer)


def handshake_event(flow: Flow, source: Workload, plan: Hbone, conn: HboneConnection, *, new: bool,
                    stream_id: int | None) -> None:
    """tls.handshake: the tunnel this connection rides, just opened (`new`) or reused from the pool.
    `stream_id` is None when step mode shows the handshake before the CONNECT's stream exists."""
    ssl_object = conn.writer.get_extra_info("ssl_object")
    local = conn.writer.get_extra_info("sockname")[:2]
    cipher = ssl_object.cipher() if ssl_object is not None else None
    peer = getattr(conn, "peer_identity", None) or plan.expected_identities[0]
    fields: dict[str, Any] = dict(
        src_identity=str(source.identity), dst_identity=str(peer), expected=[str(i) for i in plan.expected_identities],
        cipher=cipher[0] if cipher else "", tls_version=ssl_object.version() if ssl_object else "",
        alpn=ssl_object.selected_alpn_protocol() if ssl_object else "", reused=not new, local=format_addr(local),
        remote=format_addr(plan.hbone_dst))
    if stream_id is not None:
        fields["stream_id"] = stream_id
    if new:
        flow.emit("tls.handshake",
                  f"mTLS from pod {source.name} ({format_addr(local)}, opened inside the pod with mark "
                  f"{flow.pi.cfg.packet_mark}) to {format_addr(plan.hbone_dst)}: ztunnel presented {source.identity}, "
                  f"the server presented {peer} as expected; {fields['tls_version']} {fields['cipher']}, "
                  f"ALPN {fields['alpn']}", **fields)
    else:
        stream = f"HTTP/2 stream {stream_id}" if stream_id is not None else "a new HTTP/2 stream"
        flow.emit("tls.handshake",
                  f"ztunnel reused its pooled mTLS connection {format_addr(local)} -> "
                  f"{format_addr(plan.hbone_dst)} ({source.identity} -> {peer}, {fields['cipher']}, ALPN "
                  f"{fields['alpn']}): this connection becomes {stream} of that tunnel", **fields)


async def proxy_to_tcp(flow: Flow, plan: Plan, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Plain TCP from inside the pod (mark 1337) to the plan's upstream, then copy."""
    pi = flow.pi
    upstream = plan.upstream
    assert upstream is not None
    if pi.stepper.on:
        await flow.hold("upstream", f"ztunnel will connect to {format_addr(upstream)} from inside pod {flow.pod} "
                                    f"with mark {pi.cfg.packet_mark} (so the pod's rules let it out), plain TCP with "
                                    f"no mTLS, and copy bytes both ways")
    flow.open()
    sock = pi.netns.run(lambda: upstream_socket(mark=pi.cfg.packet_mark))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, upstream), pi.cfg.connect_timeout)
    except BaseException:
        sock.close()
        raise
    local = sock.getsockname()[:2]
    flow.connected(upstream, local,
                   f"ztunnel connected to {format_addr(upstream)} from inside pod {flow.pod} (source "
                   f"{format_addr(local)}) with mark {pi.cfg.packet_mark}, so the pod's rules let it out "
                   f"instead of capturing it again; plain TCP, no mTLS", plan=plan.kind)
    up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=READER_LIMIT)
    await copy_bidirectional((reader, writer), (up_reader, up_writer), flow.counts)


async def proxy_to_hbone(flow: Flow, plan: Hbone, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
    """mTLS + HTTP/2 CONNECT through a pooled tunnel, then copy bytes inside the stream."""
    pi = flow.pi
    mesh = pi.mesh
    assert mesh is not None and plan.source is not None
    source = plan.source
    flow.mtls = True
    flow.src_identity = source.identity
    flow.dst_identity = plan.expected_identities[0]
    flow.hbone_addr = plan.target
    flow.upstream = plan.hbone_dst
    flow.info.target = plan.authority
    flow.open()

    try:
        cert = await mesh.identities.get(source.identity)
    except CertificateUnavailable as e:
        raise ProxyError(str(e)) from e
    flow.emit("tls.certificate",
              f"ztunnel on {flow.node} will present pod {source.name}'s own certificate ({source.identity}, "
              f"serial {cert.serial[:16]}): the SOURCE workload's identity, never ztunnel's",
              identity=str(source.identity), serial=cert.serial, not_after=cert.not_after.isoformat(),
              role="client")

    build = create_hbone_request  # a learner's, while the HBONE request exercise runs (lab/common/seams.py)
    if mesh.seams is not None:
        build = mesh.seams.get("ztunnel.create_hbone_request", build,
                               check=lambda v: None if isinstance(v, HboneRequest) else "expected an HboneRequest")
    try:
        request = build(plan.target[0], plan.target[1], src_ip=flow.src[0], src_port=flow.src[1],
                        service_host=flow.dst_service, baggage=baggage_of(source), trace_id=flow.id)
    except SeamError as e:
        raise ProxyError(str(e)) from e
    key = WorkloadKey(src_id=source.identity, dst_id=plan.expected_identities, src=flow.src[0],
                      dst=plan.hbone_dst, netns=pi.netns)
    shown_handshake = False
    if pi.stepper.on and pi.stepper.holds(flow.started, flow.id):
        # Step mode: the mTLS handshake and the CONNECT become two steps (the pool does both in one go).
        await flow.hold("mTLS handshake",
                        f"ztunnel will open an mTLS connection from inside pod {source.name} to "
                        f"{format_addr(plan.hbone_dst)} (or reuse its pooled one), presenting {source.identity} and "
                        f"requiring the server to prove {', '.join(str(i) for i in plan.expected_identities)}")
        try:
            ahead, opened = await mesh.pool.connect_ahead(key)
        except ProxyError:
            flow.response_flags = "CONNECT"
            raise
        handshake_event(flow, source, plan, ahead, new=opened, stream_id=None)
        shown_handshake = True
        await flow.hold("CONNECT",
                        f"ztunnel will send CONNECT {request.authority} on that mTLS connection with headers baggage, "
                        f"forwarded and traceparent, then wait for the destination's answer")
    try:
        pooled = await mesh.pool.send_request(key, request.header_list())
    except ProxyError:
        flow.response_flags = "CONNECT"
        raise
    conn, stream = pooled.connection, pooled.stream
    flow.stream = stream
    local = conn.writer.get_extra_info("sockname")[:2]
    if not shown_handshake:
        handshake_event(flow, source, plan, conn, new=pooled.new, stream_id=stream.stream_id)
    flow.dst_identity = pooled.peer_identity or plan.expected_identities[0]
    headers = {k: v for k, v in request.headers}
    flow.emit("hbone.connect.sent",
              f"ztunnel sent CONNECT {request.authority} on stream {stream.stream_id} with headers baggage, "
              f"forwarded and traceparent (whose trace id is this flow's id, so the destination's steps "
              f"share it)", authority=request.authority, headers=headers, stream_id=stream.stream_id)
    try:
        status, resp_headers, stream = await conn.await_response(stream)
    except HboneHttpError as e:
        # Any non-200 answer is a connection failure from the source's side (ztunnel metrics.rs
        # `extract_failure_reason`): CONNECT, also for a 401. Only the destination reports DENY.
        flow.response_flags = FLAG_CONNECT
        flow.emit("hbone.response",
                  f"the destination answered the CONNECT with {e.status}"
                  + (": its ztunnel's authorization policy denied the connection" if e.status == 401 else
                     ": its ztunnel could not reach the app" if e.status == 503 else "")
                  + "; ztunnel resets the app's connection", status=e.status, headers=dict(e.headers))
        raise ProxyError(http_status_error(e.status)) from e
    flow.emit("hbone.response",
              f"the destination answered the CONNECT with 200: the tunnel to {request.authority} is open",
              status=status, headers=dict(resp_headers), baggage=header_value(resp_headers, "baggage") or "")
    flow.connected(plan.hbone_dst, local,
                   f"bytes now flow between the app in pod {flow.pod} and {request.authority} inside HTTP/2 "
                   f"stream {stream.stream_id} of the mTLS connection {format_addr(local)} -> "
                   f"{format_addr(plan.hbone_dst)}", protocol="HBONE", authority=request.authority)
    await hbone_copy(stream, reader, writer, chunk=COPY_CHUNK)
