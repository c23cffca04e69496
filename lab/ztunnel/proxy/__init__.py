"""The in-pod proxy of one workload: its three listeners, its connections, and how each
connection is recorded (events, access log, metrics).

Real counterparts: zt:src/proxy.rs (``Proxy``, ``ProxyInputs``, ``Error``, ``TraceParent``),
zt:src/proxyfactory.rs (a proxy per pod, created with the pod's netns) and
zt:src/proxy/metrics.rs (``ConnectionResult``: the access log line and the metrics of a
connection).

For every meshed pod ztunnel opens, *inside the pod's network namespace*:

======  ==================  =====================================================
port    listener            who sends traffic there
======  ==================  =====================================================
15001   outbound            the pod's own outgoing TCP (nat OUTPUT REDIRECT)
15006   inbound plaintext   incoming non-HBONE TCP (nat PREROUTING REDIRECT)
15008   inbound HBONE       peers' mTLS + HTTP/2 CONNECT (never redirected)
======  ==================  =====================================================

Each proxied connection is a :class:`Flow`: a 32-hex trace id, one event per step, metrics, and
one access-log line at the end. The source ztunnel sends its flow id as the trace id of the
CONNECT's ``traceparent``; the destination ztunnel adopts it, so both sides' events of one
connection share one id. The handlers are in ``outbound.py``, ``inbound_passthrough.py`` and
``inbound.py``, named as in ztunnel; the shared parts of the data path (xDS state, certificates,
the HBONE pool) are :class:`MeshInputs`, absent when ztunnel runs without a control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import random
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lab.common.seams import Seams
from lab.hbone import HboneError, wire
from lab.proto.zds import WorkloadInfo
from lab.tls.identity import Identity
from lab.ztunnel import access_log
from lab.ztunnel.config import Config
from lab.ztunnel.inpod.netns import InpodNetns
from lab.ztunnel.metrics import FLAG_NONE, UNKNOWN, ConnectionLabels, Metrics
from lab.ztunnel.proxy.relay import Transferred
from lab.ztunnel.rbac import Connection, Decision, assert_rbac
from lab.ztunnel.socket import (
    LISTEN_BACKLOG,
    Addr,
    format_addr,
    listener_socket,
    set_nodelay,
)
from lab.ztunnel.state import ProxyState, StateChanges, Workload, wait_for_workload
from lab.ztunnel.stepper import Stepper

if TYPE_CHECKING:
    from lab.hbone import HboneStream
    from lab.ztunnel.identity_manager import IdentityManager
    from lab.ztunnel.proxy.connection_manager import ConnectionManager
    from lab.ztunnel.proxy.pool import WorkloadHbonePool
    from lab.ztunnel.tls_workload import WorkloadTls

log = logging.getLogger("ztunnel.proxy")


# ------------------------------------------------------------------------------------ errors
class ProxyError(Exception):
    """A connection could not be proxied; ``str(e)`` is what the access log's ``error=`` shows."""


class SelfCall(ProxyError):
    """The destination port is one of ztunnel's own (``illegal_ports``): proxying would loop."""

    def __init__(self) -> None:
        super().__init__("attempted recursive call to ourselves")


class NoOriginalDst(ProxyError):
    """The connection reached the listener without a REDIRECT: no original destination to use."""

    def __init__(self, err: OSError) -> None:
        super().__init__(f"failed to read the original destination (SO_ORIGINAL_DST): {io_error(err)}")


class HboneNotServed(ProxyError):
    """Port 15008 accepted a connection, but this ztunnel has no control plane (no certificates)."""

    def __init__(self) -> None:
        super().__init__("HBONE (mTLS + HTTP/2 CONNECT) is not served: this ztunnel runs without istiod "
                         "(no --xds-address), so it has no certificates")


class UnknownWorkload(ProxyError):
    """The pod ztunnel proxies never appeared in xDS (zt ``Error::UnknownSource``/``UnknownDestination``)."""

    def __init__(self, what: str, pod: InpodWorkload, timeout: float) -> None:
        super().__init__(f"unknown {what}: pod {pod.namespace}/{pod.name} is not in ztunnel's workload "
                         f"state (waited {timeout:g}s for istiod)")


#: zt:src/proxy.rs Error::... text when a pod's proxy is drained with connections still open.
CONNECTION_DRAIN = "connection closed due to connection drain"
#: zt:src/proxy.rs AuthorizationPolicyRejection
POLICY_REJECTION = "connection closed due to policy rejection: {reason}"


def io_error(err: BaseException) -> str:
    """An OS error the way ztunnel's log prints an io::Error: ``io error: Connection refused (os error 111)``."""
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)) or getattr(err, "errno", None) == errno.ETIMEDOUT:
        return "connection timed out"
    code = getattr(err, "errno", None)
    if code is None and isinstance(err, ConnectionResetError):
        code = errno.ECONNRESET  # asyncio's "peer went away during the TLS handshake" has no errno
    if code is None:
        return f"io error: {str(err) or type(err).__name__}"
    return f"io error: {os.strerror(code)} (os error {code})"


def new_trace_id() -> str:
    """A random 128-bit trace id as 32 lowercase hex digits (W3C trace-context ``trace-id``)."""
    return secrets.token_hex(16)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with a RST instead of a FIN (``SO_LINGER`` 0, then close): what
    ztunnel does to the app's connection when it cannot proxy it, so that the app sees
    "connection reset by peer" (curl exit code 56)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ------------------------------------------------------------------------------------ inputs
class Emit(Protocol):
    """The shape of ``EventEmitter.emit``: one event per step."""

    def __call__(self, kind: str, msg: str, *, pod: str = "", flow: str = "", **fields: Any) -> Any: ...


@dataclass(frozen=True)
class InpodWorkload:
    """The pod a proxy serves, as the node agent named it over ZDS (uid + WorkloadInfo).

    Not the xDS ``Workload`` (addresses, protocol, services): ztunnel matches the two by uid, or
    name and namespace, once it has xDS (`MeshInputs.workload_of`)."""

    uid: str
    info: WorkloadInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def namespace(self) -> str:
        return self.info.namespace

    @property
    def key(self) -> str:
        """``name.namespace``: how ``istioctl zc connections`` names a workload."""
        return f"{self.info.name}.{self.info.namespace}"


@dataclass
class MeshInputs:
    """The data path's view of the mesh, shared by every pod's proxy (zt ``ProxyInputs``: state,
    cert manager, pool). Absent when ztunnel runs without a control plane."""

    state: ProxyState
    changes: StateChanges
    identities: IdentityManager
    tls: WorkloadTls
    pool: WorkloadHbonePool
    rng: random.Random = field(default_factory=random.Random)
    seams: Seams | None = None  # a graded exercise's learner code (lab/common/seams.py)

    def authorize(self, workload: Workload, conn: Connection) -> Decision:
        """L4 authorization of a connection to `workload` over its policies (zt `assert_rbac`),
        with the learner's `assert_rbac` while the authorization exercise runs."""
        decide = assert_rbac
        if self.seams is not None:
            decide = self.seams.get("ztunnel.assert_rbac", assert_rbac,
                                    check=lambda v: None if isinstance(v, Decision) else "expected a Decision")
        return decide(self.state.policies_for(workload), conn)

    async def workload_of(self, pod: InpodWorkload, timeout: float) -> Workload | None:
        """The pod's xDS Workload, waiting up to `timeout` for it (zt ``wait_for_workload``)."""
        return await wait_for_workload(self.state, self.changes, pod.uid, pod.name, pod.namespace, timeout)


@dataclass
class ProxyInputs:
    """What every handler of one pod's proxy needs."""

    cfg: Config
    workload: InpodWorkload
    netns: InpodNetns
    connections: ConnectionManager
    emit: Emit
    write_access_log: Callable[[str], None]
    metrics: Metrics = field(default_factory=Metrics)
    mesh: MeshInputs | None = None
    stepper: Stepper = field(default_factory=Stepper)  # step mode (off unless the learner turns it on)


# ------------------------------------------------------------------------------------ flows
@dataclass
class ConnectionInfo:
    """One open connection as the admin interface shows it (``istioctl zc connections``)."""

    flow: str
    uid: str
    workload: str  # name.namespace
    direction: str  # "outbound" | "inbound"
    local: str
    remote: str
    target: str
    protocol: str = "TCP"

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


_keys = itertools.count(1)


def _principal(identity: Identity | None) -> str:
    return identity.uri if identity is not None else UNKNOWN


def _workload_label(w: Workload | None) -> tuple[str, str]:
    if w is None:
        return UNKNOWN, UNKNOWN
    return (w.workload_name or w.name), w.namespace


class Flow:
    """One connection through the proxy: its trace id, its steps (events), its metrics and its
    result (the access log). The ``msg`` of every event is a sentence for a newcomer; the fields
    carry the same facts as data. ``finish`` records the end exactly once."""

    def __init__(self, pi: ProxyInputs, direction: str, port: int, src: Addr, local: Addr, *,
                 sock: socket.socket | None = None, flow_id: str | None = None) -> None:
        self.pi = pi
        self.id = flow_id or new_trace_id()
        self.key = f"{self.id}/{direction}/{next(_keys)}"
        self.direction = direction
        self.port = port
        self.sock = sock
        self.src: Addr = src
        self.local: Addr = local
        self.started = time.monotonic()
        self.target: Addr | None = None  # original destination / the authority's target
        self.upstream: Addr | None = None  # the TCP next hop ztunnel connected to
        self.upstream_local: Addr | None = None
        self.hbone_addr: Addr | None = None  # dst.hbone_addr: the CONNECT's target
        self.src_workload: Workload | None = None
        self.dst_workload: Workload | None = None
        self.dst_service: str | None = None
        self.src_identity: Identity | None = None
        self.dst_identity: Identity | None = None
        self.mtls = False
        self.response_flags = FLAG_NONE
        self.counts = Transferred()
        self.stream: HboneStream | None = None
        self.labels: ConnectionLabels | None = None  # set when opened
        self.closing: str | None = None  # why ztunnel is closing it (drain, policy change)
        self.done = False
        self.info = ConnectionInfo(self.id, pi.workload.uid, pi.workload.key, direction,
                                   local=format_addr(local), remote=format_addr(src), target="")

    @classmethod
    def accepted(cls, pi: ProxyInputs, direction: str, port: int, writer: asyncio.StreamWriter) -> Flow:
        """The flow of a TCP connection one of the listeners accepted."""
        return cls(pi, direction, port, writer.get_extra_info("peername")[:2],
                   writer.get_extra_info("sockname")[:2], sock=writer.get_extra_info("socket"))

    # -- helpers
    @property
    def node(self) -> str:
        return self.pi.cfg.node

    @property
    def pod(self) -> str:
        return self.pi.workload.name

    def emit(self, kind: str, msg: str, **fields: Any) -> None:
        self.pi.emit(kind, msg, pod=self.pod, flow=self.id, namespace=self.pi.workload.namespace,
                     direction=self.direction, **fields)

    def duration_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000

    async def hold(self, step: str, next_sentence: str) -> None:
        """Step mode: wait before `step` until the learner releases it (lab/ztunnel/stepper.py).
        Callers check ``self.pi.stepper.on`` first, so that step mode off costs one boolean."""
        await self.pi.stepper.gate(self.id, step, next_sentence, started=self.started, pod=self.pod,
                                   namespace=self.pi.workload.namespace, direction=self.direction)

    def transferred(self) -> tuple[int, int]:
        """(downstream -> upstream, upstream -> downstream) bytes so far; for HBONE read live from
        the stream, so a connection cut midway still reports what it carried."""
        if self.stream is None:
            return self.counts.downstream_to_upstream, self.counts.upstream_to_downstream
        if self.direction == "outbound":  # downstream = the app, upstream = the stream
            return self.stream.bytes_sent, self.stream.bytes_received
        return self.stream.bytes_received, self.stream.bytes_sent  # downstream = the stream

    # -- the steps
    def captured(self, how: str) -> None:
        self.emit("conn.captured",
                  f"ztunnel on {self.node} accepted a connection {how} to its port {self.port}",
                  src=format_addr(self.src), local=format_addr(self.local), port=self.port)

    def original_dst(self, target: Addr, how: str) -> None:
        self.target = target
        self.info.target = format_addr(target)
        self.emit("conn.original_dst", how, dst=format_addr(target))

    def connected(self, upstream: Addr, upstream_local: Addr, how: str, *, protocol: str = "TCP",
                  **fields: Any) -> None:
        """conn.upstream: ztunnel's leg towards the destination is up."""
        self.upstream, self.upstream_local = upstream, upstream_local
        self.info.protocol = protocol
        if self.direction == "outbound":
            self.info.local, self.info.remote = format_addr(upstream_local), format_addr(upstream)
        self.emit("conn.upstream", how, upstream=format_addr(upstream), src=format_addr(upstream_local),
                  mark=self.pi.cfg.packet_mark, protocol=protocol, **fields)

    def open(self) -> None:
        """The connection is now being proxied: count it (istio_tcp_connections_opened_total)."""
        if self.labels is None:
            self.labels = self.metric_labels()
            self.pi.metrics.opened(self.labels)

    @property
    def opened(self) -> bool:
        return self.labels is not None

    def metric_labels(self) -> ConnectionLabels:
        """This connection's labels (reporter = source for outbound, destination for inbound)."""
        src_wl, src_ns = _workload_label(self.src_workload)
        dst_wl, dst_ns = _workload_label(self.dst_workload)
        return ConnectionLabels(
            reporter="source" if self.direction == "outbound" else "destination",
            source_workload=src_wl, source_workload_namespace=src_ns,
            source_principal=_principal(self.src_identity) if self.mtls else UNKNOWN,
            destination_workload=dst_wl, destination_workload_namespace=dst_ns,
            # known for any known destination workload, also in plaintext (zt metrics.rs with_destination);
            # only the access log leaves identities out without mTLS
            destination_principal=_principal(self.dst_identity if self.mtls and self.dst_identity
                                             else self.dst_workload.identity if self.dst_workload else None),
            destination_service=self.dst_service or UNKNOWN,
            connection_security_policy="mutual_tls" if self.mtls else "unknown",
            response_flags=self.response_flags)

    def result(self, error: str | None) -> access_log.ConnectionResult:
        """This flow as ztunnel's ConnectionResult (what the access log prints)."""
        d2u, u2d = self.transferred()
        ids = self.mtls
        src_w, dst_w = self.src_workload, self.dst_workload
        if self.direction == "outbound":
            return access_log.ConnectionResult(
                direction="outbound", src_addr=self.src,
                src_workload=src_w.name if src_w else self.pi.workload.name,
                src_namespace=src_w.namespace if src_w else self.pi.workload.namespace,
                src_identity=str(self.src_identity) if ids and self.src_identity else None,
                dst_addr=self.upstream or self.target, dst_hbone_addr=self.hbone_addr,
                dst_service=self.dst_service, dst_workload=dst_w.name if dst_w else None,
                dst_namespace=dst_w.namespace if dst_w else None,
                dst_identity=str(self.dst_identity) if ids and self.dst_identity else None,
                bytes_sent=d2u, bytes_recv=u2d, duration_ms=self.duration_ms(), error=error)
        return access_log.ConnectionResult(
            direction="inbound", src_addr=self.src,
            src_workload=src_w.name if src_w else None, src_namespace=src_w.namespace if src_w else None,
            src_identity=str(self.src_identity) if ids and self.src_identity else None,
            dst_addr=self.local if self.hbone_addr else (self.target or self.local),
            dst_hbone_addr=self.hbone_addr, dst_service=self.dst_service,
            dst_workload=dst_w.name if dst_w else self.pi.workload.name,
            dst_namespace=dst_w.namespace if dst_w else self.pi.workload.namespace,
            dst_identity=str(self.dst_identity) if ids and self.dst_identity else None,
            bytes_sent=u2d, bytes_recv=d2u, duration_ms=self.duration_ms(), error=error)

    def finish(self, error: str | None = None) -> None:
        """Write the access-log line, count the close, emit the closing event (once)."""
        if self.done:
            return
        self.done = True
        r = self.result(error)
        early = error is not None and not self.opened
        self.pi.write_access_log(access_log.format_line(r, failed=early))
        request, response = self.transferred()
        if self.labels is not None:
            labels = dataclasses.replace(self.labels, response_flags=self.response_flags)
            self.pi.metrics.closed(labels, request_bytes=request, response_bytes=response, failed=error is not None)
        # A connection refused before it was proxied (no ConnectionResult yet) is logged, not
        # counted: ztunnel's `log_early_deny` (src/proxy/metrics.rs) touches no metric.
        dst = format_addr(r.dst_addr)
        ms = round(r.duration_ms or 0)
        side = "of the source pod" if self.direction == "outbound" else "of the destination pod"
        if error is None:
            self.emit("conn.closed",
                      f"the connection from {format_addr(self.src)} to {dst} closed after {ms} ms: "
                      f"{r.bytes_sent} bytes sent and {r.bytes_recv} received, as seen by ztunnel on {self.node} "
                      f"({side})", src=format_addr(self.src), dst=dst, bytes_sent=r.bytes_sent,
                      bytes_recv=r.bytes_recv, duration_ms=ms, protocol=self.info.protocol)
        else:
            self.emit("conn.failed",
                      f"ztunnel on {self.node} ended the connection from {format_addr(self.src)} to "
                      f"{dst or 'an unknown destination'}: {error}",
                      src=format_addr(self.src), dst=dst, error=error, bytes_sent=r.bytes_sent,
                      bytes_recv=r.bytes_recv, duration_ms=ms, response_flags=self.response_flags)


#: What a handler reads the app's bytes from: a wire.ChunkReader on ztunnel's listeners (each
#: chunk as the socket returned it), a StreamReader elsewhere; the copy loops only call read().
AppReader = wire.ChunkReader | asyncio.StreamReader
Handler = Callable[[Flow, AppReader, asyncio.StreamWriter], Awaitable[None]]


async def serve_connection(pi: ProxyInputs, direction: str, port: int, handler: Handler,
                           reader: AppReader, writer: asyncio.StreamWriter) -> None:
    """Run one accepted connection through `handler`, tracked for the admin, drains and policy
    re-checks.

    Success closes the app's connection gracefully. Any error resets it (RST) and is logged with
    ``error=``; a drain (the pod left the mesh, ztunnel stops) or a policy change cancels the
    handler and is logged with its reason.
    """
    flow = Flow.accepted(pi, direction, port, writer)
    task = asyncio.current_task()
    assert task is not None
    pi.connections.register(flow, task)
    ok = False
    try:
        await handler(flow, reader, writer)
        flow.finish()
        ok = True
    except asyncio.CancelledError:
        if not flow.closing:
            raise
        task.uncancel()
        flow.finish(flow.closing)
    except (ProxyError, HboneError) as e:
        flow.finish(str(e))
    except (OSError, TimeoutError) as e:
        flow.finish(io_error(e))
    except Exception as e:  # a bug: log it loudly, still close the connection
        log.exception("connection %s failed", flow.id)
        flow.finish(f"internal error: {e!r}")
    finally:
        pi.connections.release(flow)
        if ok:
            writer.close()
        else:
            reset(writer)


# ------------------------------------------------------------------------------------ the proxy
@dataclass
class Listener:
    """One of ztunnel's listening sockets in a pod."""

    port: int
    what: str  # "outbound" | "inbound plaintext" | "inbound HBONE"
    address: str
    server: asyncio.AbstractServer | None = field(default=None, repr=False)
    accept_task: asyncio.Task[None] | None = field(default=None, repr=False)
    sock: socket.socket | None = field(default=None, repr=False)

    @property
    def open(self) -> bool:
        return self.server is not None or self.accept_task is not None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.accept_task is not None:
            if self.sock is not None and self.sock.fileno() >= 0:
                # Unregister the pending accept before closing, so that the cancelled accept cannot
                # unregister a new socket that happens to reuse this fd number.
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.accept_task.cancel()
            self.accept_task = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "what": self.what, "address": self.address}


def listener_plan(cfg: Config) -> list[tuple[int, str]]:
    """The in-pod listeners ztunnel opens for every pod, in order (pure)."""
    return [(cfg.outbound_port, "outbound"), (cfg.inbound_plaintext_port, "inbound plaintext"),
            (cfg.inbound_port, "inbound HBONE")]


#: StreamReader buffer of the connections ztunnel opens to apps (asyncio's 64 KiB default slows relaying).
READER_LIMIT = 1024 * 1024
#: Bytes taken from one side per step of the HBONE copy: large steps mean fewer, larger HTTP/2
#: DATA frames (up to the 1 MiB frame size) and fewer trips through the event loop.
COPY_CHUNK = 1024 * 1024


async def _accept_loop(sock: socket.socket, on_accept: Callable[[socket.socket], Awaitable[None]]) -> None:
    """Accept raw sockets (for 15008, where TLS starts only once the pod's certificate is known)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            set_nodelay(conn)
            task = asyncio.create_task(on_accept(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()


class Proxy:
    """One pod's in-pod proxy: three listeners in the pod's netns, served by this process."""

    def __init__(self, pi: ProxyInputs) -> None:
        self.pi = pi
        self.listeners: list[Listener] = []
        self.started_at = time.time()

    async def start(self) -> None:
        """Create the listeners inside the pod (one setns round trip) and serve them.

        Raises OSError if any listener cannot be created (the caller NACKs); then nothing is
        left open. The pod's netns fd is not closed here on failure: the caller still owns it.
        """
        from lab.ztunnel.proxy import inbound, inbound_passthrough, outbound

        cfg = self.pi.cfg
        handlers: dict[int, tuple[str, Handler]] = {
            cfg.outbound_port: ("outbound", outbound.handle),
            cfg.inbound_plaintext_port: ("inbound", inbound_passthrough.handle),
            cfg.inbound_port: ("inbound", inbound.handle),
        }
        plan = listener_plan(cfg)

        def create_all() -> list[socket.socket]:
            made: list[socket.socket] = []
            try:
                for port, _ in plan:
                    made.append(listener_socket(port, mark=cfg.packet_mark, reuse_port=cfg.port_reuse))
            except BaseException:
                for s in made:
                    s.close()
                raise
            return made

        socks = self.pi.netns.run(create_all)
        try:
            for (port, what), sock in zip(plan, socks):
                address = format_addr(sock.getsockname()[:2])
                if port == cfg.inbound_port and self.pi.mesh is not None:
                    # HBONE: accept raw, TLS with the pod's own certificate (inbound.serve_tunnel)
                    task = asyncio.create_task(_accept_loop(sock, lambda s: inbound.serve_tunnel(self.pi, s)),
                                               name=f"hbone-accept {self.pi.workload.key}")
                    listener = Listener(port, what, address, accept_task=task, sock=sock)
                else:
                    direction, handler = handlers[port]

                    def on_accept(r: wire.ChunkReader, w: asyncio.StreamWriter, *,
                                  _d: str = direction, _p: int = port, _h: Handler = handler) -> Awaitable[None]:
                        return serve_connection(self.pi, _d, _p, _h, r, w)

                    server = await wire.start_server(on_accept, sock=sock, backlog=LISTEN_BACKLOG)
                    listener = Listener(port, what, address, server)
                self.listeners.append(listener)
                w = self.pi.workload
                self.pi.emit("ztunnel.listener.created",
                             f"ztunnel on {cfg.node} opened its {what} listener {listener.address} inside "
                             f"pod {w.name}'s network namespace (mark {cfg.packet_mark}, SO_REUSEPORT)",
                             pod=w.name, namespace=w.namespace, port=port, what=what,
                             address=listener.address, netns_inode=self.pi.netns.id.inode)
        except BaseException:
            for s in socks:
                s.close()
            self.close_listeners()
            raise

    def close_listeners(self) -> None:
        """Stop accepting: the listening sockets are closed at once (gone from ``ss -tln``)."""
        for listener in self.listeners:
            listener.close()

    async def drain(self, reason: str = CONNECTION_DRAIN) -> int:
        """Close the listeners, every open connection and tunnel; release the pod's netns."""
        self.close_listeners()
        n = await self.pi.connections.drain(self.pi.workload.uid, reason)
        if self.pi.mesh is not None:
            await self.pi.mesh.pool.close_from(self.pi.netns)
        self.pi.netns.close()
        return n

    def to_dict(self) -> dict[str, Any]:
        w = self.pi.workload
        return {"uid": w.uid, "name": w.name, "namespace": w.namespace,
                "service_account": w.info.service_account,
                "netns_inode": self.pi.netns.id.inode, "netns_dev": self.pi.netns.id.dev,
                "listeners": [l.to_dict() for l in self.listeners if l.open],
                "started": self.started_at}


def __getattr__(name: str) -> Any:
    """``ConnectionManager`` moved to proxy/connection_manager.py (as in ztunnel); still importable here."""
    if name == "ConnectionManager":
        from lab.ztunnel.proxy.connection_manager import ConnectionManager

        return ConnectionManager
    raise AttributeError(name)
