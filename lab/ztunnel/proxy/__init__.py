"""The in-pod proxy of one workload: its three listeners, its connections, and how each
connection is recorded (events + access log).

Real counterparts: zt:src/proxy.rs (``Proxy``, ``ProxyInputs``, ``Error``, ``TraceParent``),
zt:src/proxyfactory.rs (a proxy per pod, created with the pod's netns) and
zt:src/proxy/connection_manager.rs (the open connections, drained when the pod goes away).

For every meshed pod ztunnel opens, *inside the pod's network namespace*:

======  ==================  =====================================================
port    listener            who sends traffic there
======  ==================  =====================================================
15001   outbound            the pod's own outgoing TCP (nat OUTPUT REDIRECT)
15006   inbound plaintext   incoming non-HBONE TCP (nat PREROUTING REDIRECT)
15008   inbound HBONE       peers' mTLS + HTTP/2 CONNECT (never redirected)
======  ==================  =====================================================

Each accepted connection becomes a :class:`Flow`: a random 32-hex trace id (the id a W3C
``traceparent`` would carry, so later the HBONE hop can pass it on), one event per step, and one
access-log line at the end. The handlers themselves are in ``outbound.py``,
``inbound_passthrough.py`` and ``inbound.py``, named as in ztunnel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

from lab.zds import WorkloadInfo
from lab.ztunnel import access_log
from lab.ztunnel.config import Config
from lab.ztunnel.inpod.netns import InpodNetns
from lab.ztunnel.proxy.relay import Transferred
from lab.ztunnel.socket import Addr, format_addr, listener_socket

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
    """Port 15008 accepted a connection, but this ztunnel does not terminate HBONE yet."""

    def __init__(self) -> None:
        super().__init__("HBONE (mTLS + HTTP/2 CONNECT) is not served by this ztunnel yet")


#: zt:src/proxy.rs Error::... text when a pod's proxy is drained with connections still open.
CONNECTION_DRAIN = "connection closed due to connection drain"


def io_error(err: OSError) -> str:
    """An OS error the way ztunnel's log prints an io::Error: ``io error: Connection refused (os error 111)``."""
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)) or err.errno == errno.ETIMEDOUT:
        return "connection timed out"
    if err.errno is None:
        return f"io error: {err}"
    return f"io error: {os.strerror(err.errno)} (os error {err.errno})"


def new_trace_id() -> str:
    """A random 128-bit trace id as 32 lowercase hex digits (W3C trace-context ``trace-id``)."""
    return secrets.token_hex(16)


# ------------------------------------------------------------------------------------ inputs
class Emit(Protocol):
    """The shape of ``EventEmitter.emit``: one event per step."""

    def __call__(self, kind: str, msg: str, *, pod: str = "", flow: str = "", **fields: Any) -> Any: ...


@dataclass(frozen=True)
class InpodWorkload:
    """The pod a proxy serves, as the node agent named it over ZDS (uid + WorkloadInfo).

    Not the xDS ``Workload`` (addresses, protocol, services): ztunnel matches the two by name,
    namespace and service account once it has xDS."""

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
class ProxyInputs:
    """What every handler of one pod's proxy needs (zt ``ProxyInputs``)."""

    cfg: Config
    workload: InpodWorkload
    netns: InpodNetns
    connections: "ConnectionManager"
    emit: Emit
    write_access_log: Callable[[str], None]


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


class Flow:
    """One connection through the proxy: its trace id, its steps (events) and its result.

    The ``msg`` of every event is a sentence for a newcomer; the fields carry the same facts as
    data. ``finish`` writes the access-log line exactly once.
    """

    def __init__(self, pi: ProxyInputs, direction: str, port: int, writer: asyncio.StreamWriter) -> None:
        self.pi = pi
        self.id = new_trace_id()
        self.direction = direction
        self.port = port
        self.sock: socket.socket = writer.get_extra_info("socket")
        self.src: Addr = writer.get_extra_info("peername")[:2]
        self.local: Addr = writer.get_extra_info("sockname")[:2]
        self.started = time.monotonic()
        self.target: Optional[Addr] = None  # the original destination
        self.upstream: Optional[Addr] = None  # the TCP next hop ztunnel connected to
        self.upstream_local: Optional[Addr] = None
        self.forwarded_at: Optional[float] = None
        self.counts = Transferred()
        self.draining = False
        self.done = False
        self.info = ConnectionInfo(self.id, pi.workload.uid, pi.workload.key, direction,
                                   local=format_addr(self.local), remote=format_addr(self.src), target="")

    # -- helpers
    @property
    def node(self) -> str:
        return self.pi.cfg.node

    @property
    def pod(self) -> str:
        return self.pi.workload.name

    def emit(self, kind: str, msg: str, **fields: Any) -> None:
        self.pi.emit(kind, msg, pod=self.pod, flow=self.id, namespace=self.pi.workload.namespace, **fields)

    def duration_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000

    # -- the steps
    def captured(self, how: str) -> None:
        self.emit("conn.captured",
                  f"ztunnel on {self.node} accepted a connection {how} to its port {self.port}",
                  direction=self.direction, src=format_addr(self.src), local=format_addr(self.local),
                  port=self.port)

    def original_dst(self, target: Addr, how: str) -> None:
        self.target = target
        self.info.target = format_addr(target)
        self.emit("conn.original_dst", how, dst=format_addr(target), direction=self.direction)

    def forwarded(self, upstream: Addr, upstream_local: Addr, how: str, **fields: Any) -> None:
        self.upstream, self.upstream_local = upstream, upstream_local
        self.forwarded_at = time.monotonic()
        if self.direction == "outbound":
            self.info.local, self.info.remote = format_addr(upstream_local), format_addr(upstream)
        self.emit("conn.forwarded", how, upstream=format_addr(upstream), src=format_addr(upstream_local),
                  mark=self.pi.cfg.packet_mark, protocol="TCP", direction=self.direction, **fields)

    def result(self, error: Optional[str]) -> access_log.ConnectionResult:
        """This flow as ztunnel's ConnectionResult (what the access log prints)."""
        w = self.pi.workload
        up, down = self.counts.downstream_to_upstream, self.counts.upstream_to_downstream
        if self.direction == "outbound":
            return access_log.ConnectionResult(
                direction="outbound", src_addr=self.src, src_workload=w.name, src_namespace=w.namespace,
                dst_addr=self.upstream or self.target, bytes_sent=up, bytes_recv=down,
                duration_ms=self.duration_ms(), error=error)
        return access_log.ConnectionResult(
            direction="inbound", src_addr=self.src, dst_addr=self.target or self.local,
            dst_workload=w.name, dst_namespace=w.namespace, bytes_sent=down, bytes_recv=up,
            duration_ms=self.duration_ms(), error=error)

    def finish(self, error: Optional[str] = None) -> None:
        """Write the access-log line and the closing event (once)."""
        if self.done:
            return
        self.done = True
        early = self.forwarded_at is None
        r = self.result(error)
        self.pi.write_access_log(access_log.format_line(r, failed=error is not None and early))
        dst = format_addr(r.dst_addr)
        ms = round(r.duration_ms or 0)
        if error is None:
            self.emit("conn.closed",
                      f"the connection from {format_addr(self.src)} to {dst} closed after {ms} ms: "
                      f"{r.bytes_sent} bytes sent and {r.bytes_recv} received, as seen by ztunnel "
                      f"{'of the source pod' if self.direction == 'outbound' else 'of the destination pod'}",
                      direction=self.direction, src=format_addr(self.src), dst=dst, bytes_sent=r.bytes_sent,
                      bytes_recv=r.bytes_recv, duration_ms=ms)
        else:
            self.emit("conn.failed",
                      f"ztunnel on {self.node} ended the connection from {format_addr(self.src)} to "
                      f"{dst or 'an unknown destination'}: {error}",
                      direction=self.direction, src=format_addr(self.src), dst=dst, error=error,
                      bytes_sent=r.bytes_sent, bytes_recv=r.bytes_recv, duration_ms=ms)


Handler = Callable[[Flow, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve_connection(pi: ProxyInputs, direction: str, port: int, handler: Handler,
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Run one accepted connection through `handler`, tracked for the admin and for drains.

    Errors end the connection and are logged with ``error=``; a drain (the pod left the mesh,
    or ztunnel stops) cancels the handler and is logged as "connection closed due to connection
    drain".
    """
    flow = Flow(pi, direction, port, writer)
    task = asyncio.current_task()
    assert task is not None
    pi.connections.register(flow, task)
    try:
        await handler(flow, reader, writer)
        flow.finish()
    except asyncio.CancelledError:
        if not flow.draining:
            raise
        task.uncancel()
        flow.finish(CONNECTION_DRAIN)
    except ProxyError as e:
        flow.finish(str(e))
    except (OSError, asyncio.TimeoutError, TimeoutError) as e:
        flow.finish(io_error(e))
    except Exception as e:  # a bug: log it loudly, still close the connection
        log.exception("connection %s failed", flow.id)
        flow.finish(f"internal error: {e!r}")
    finally:
        pi.connections.release(flow)
        if flow.draining:
            writer.transport.abort()  # drained: no graceful FIN, as the proxy is going away
        else:
            writer.close()


class ConnectionManager:
    """Every open connection of this ztunnel, by flow id (zt ``ConnectionManager``)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Flow, asyncio.Task[Any]]] = {}

    def register(self, flow: Flow, task: asyncio.Task[Any]) -> None:
        self._open[flow.id] = (flow, task)

    def release(self, flow: Flow) -> None:
        self._open.pop(flow.id, None)

    def connections(self, uid: Optional[str] = None) -> list[ConnectionInfo]:
        return [f.info for f, _ in self._open.values() if uid is None or f.info.uid == uid]

    async def drain(self, uid: str, timeout: float = 1.0) -> int:
        """Close every open connection of pod `uid`; return how many there were."""
        tasks = []
        for flow, task in list(self._open.values()):
            if flow.info.uid == uid:
                flow.draining = True
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return len(tasks)


# ------------------------------------------------------------------------------------ the proxy
@dataclass
class Listener:
    """One of ztunnel's listening sockets in a pod."""

    port: int
    what: str  # "outbound" | "inbound plaintext" | "inbound HBONE"
    address: str
    server: Optional[asyncio.AbstractServer] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "what": self.what, "address": self.address}


def listener_plan(cfg: Config) -> list[tuple[int, str]]:
    """The in-pod listeners ztunnel opens for every pod, in order (pure)."""
    return [(cfg.outbound_port, "outbound"), (cfg.inbound_plaintext_port, "inbound plaintext"),
            (cfg.inbound_port, "inbound HBONE")]


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

        handlers: dict[int, tuple[str, Handler]] = {
            self.pi.cfg.outbound_port: ("outbound", outbound.handle),
            self.pi.cfg.inbound_plaintext_port: ("inbound", inbound_passthrough.handle),
            self.pi.cfg.inbound_port: ("inbound", inbound.handle),
        }
        plan = listener_plan(self.pi.cfg)
        cfg = self.pi.cfg

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
                direction, handler = handlers[port]

                def on_accept(r: asyncio.StreamReader, w: asyncio.StreamWriter, *,
                              _d: str = direction, _p: int = port, _h: Handler = handler) -> Awaitable[None]:
                    return serve_connection(self.pi, _d, _p, _h, r, w)

                server = await asyncio.start_server(on_accept, sock=sock, limit=256 * 1024)
                listener = Listener(port, what, format_addr(sock.getsockname()[:2]), server)
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
            if listener.server is not None:
                listener.server.close()
                listener.server = None

    async def drain(self) -> int:
        """Close the listeners, then every open connection; release the pod's netns."""
        self.close_listeners()
        n = await self.pi.connections.drain(self.pi.workload.uid)
        self.pi.netns.close()
        return n

    def to_dict(self) -> dict[str, Any]:
        w = self.pi.workload
        return {"uid": w.uid, "name": w.name, "namespace": w.namespace,
                "service_account": w.info.service_account,
                "netns_inode": self.pi.netns.id.inode, "netns_dev": self.pi.netns.id.dev,
                "listeners": [l.to_dict() for l in self.listeners if l.server is not None],
                "started": self.started_at}
