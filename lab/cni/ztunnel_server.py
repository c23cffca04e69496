"""The istio-cni node agent's ZDS server: hands pod network namespaces to ztunnel.

Real counterpart: is:cni/pkg/nodeagent/ztunnelserver.go (+ ztunnelserver_linux.go).

The node agent *listens* on a unix SOCK_SEQPACKET socket; ztunnel *connects*. Per
connection:

1. ztunnel sends ``ZdsHello``.
2. The agent sends its snapshot: for every pod it knows, ``AddWorkload`` + the pod's netns
   fd, or ``KeepWorkload`` when it has no netns for that pod, waiting for the ack of each
   message (5 s deadline) before the next one.
3. The agent sends ``SnapshotSent``; ztunnel drains proxies the snapshot did not mention.
4. Afterwards ``add_pod`` goes to the *latest* connected ztunnel (the new one during an
   upgrade), ``del_pod`` to *all* of them.

ZDS acks carry no request id: an ack belongs to the one request outstanding on that
connection. So each connection sends one request at a time (a lock here, a single
goroutine in Istio), and an ack that arrives when nothing is outstanding is refused.

Lab differences: the agent notices a ztunnel that went away at once (a reader task per
connection) instead of probing every 5 s; a malformed packet from ztunnel is refused
and logged but does not end the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from lab.proto.zds import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsClosed,
    ZdsError,
    ZdsHello,
    message_text,
    netns_identity,
    recv_msg_async,
    send_msg_async,
)

log = logging.getLogger(__name__)

#: Deadline for ztunnel's Hello and for every ack (`readWriteDeadline` in Istio).
READ_WRITE_DEADLINE = 5.0

EventCallback = Callable[[dict[str, Any]], None]


class ZtunnelUnavailable(Exception):
    """No ztunnel could take the request; the caller marks the pod `redirection: pending`.

    Istio's PodAdded returns "no ztunnel connection" in this case.
    """


class AckTimeout(ZtunnelUnavailable):
    """ztunnel did not acknowledge within the deadline (the connection is kept, as in Istio)."""


@dataclass
class CachedPod:
    """One entry of the agent's pod cache (Istio: PodNetnsCache): who the pod is + its netns."""

    info: WorkloadInfo
    netns_fd: Optional[int]  # owned by the cache (a dup of the caller's fd), or None -> Keep


@dataclass
class _Connection:
    """One connected ztunnel. Requests on it are serialised by `lock`."""

    id: int
    sock: socket.socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    hello: "asyncio.Future[ZdsHello]" = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    pending: Optional["asyncio.Future[WorkloadResponse]"] = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    snapshot_done: bool = False


def _pod_name(info: Optional[WorkloadInfo]) -> Optional[str]:
    return f"{info.namespace}/{info.name}" if info else None


class ZtunnelServer:
    """The node agent's side of ZDS: a pod cache plus the connected ztunnels.

    Usage::

        server = ZtunnelServer("/run/ambient-lab/<lab>/<node>/ztunnel.sock", on_event=emit)
        await server.start()
        resp = await server.add_pod(uid, WorkloadInfo(name, ns, sa), netns_fd)  # may raise ZtunnelUnavailable
        await server.del_pod(uid)
        await server.close()

    The cache keeps its own duplicate of every netns fd; the caller keeps (and closes) its own.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        on_event: Optional[EventCallback] = None,
        ack_timeout: float = READ_WRITE_DEADLINE,
    ) -> None:
        self.path = os.fspath(path)
        self.ack_timeout = ack_timeout
        self._on_event = on_event
        self._pods: dict[str, CachedPod] = {}
        self._conns: list[_Connection] = []  # oldest first; the last one is the "latest"
        self._ids = itertools.count(1)
        self._listener: Optional[socket.socket] = None
        self._accept_task: Optional[asyncio.Task[None]] = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._changed: Optional[asyncio.Condition] = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listen on the unix SOCK_SEQPACKET path (a stale socket file is removed first, as in Istio)."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            lsock.bind(self.path)
            lsock.listen(16)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        self._listener = lsock
        self._changed = asyncio.Condition()
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"zds-accept {self.path}")
        log.info("ZDS server listening on %s", self.path)

    async def close(self) -> None:
        """Stop listening, drop every ztunnel connection and close the cached netns fds."""
        if self._accept_task:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for task in list(self._conn_tasks):
            task.cancel()
        for task in list(self._conn_tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pod in self._pods.values():
            if pod.netns_fd is not None:
                os.close(pod.netns_fd)
        self._pods.clear()

    async def __aenter__(self) -> "ZtunnelServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ state
    @property
    def connections(self) -> int:
        """How many ztunnels are connected (Istio's `ztunnel_connected` gauge)."""
        return len(self._conns)

    def pods(self) -> dict[str, tuple[WorkloadInfo, Optional[tuple[int, int]]]]:
        """The pod cache as plain data: uid -> (info, netns identity or None)."""
        return {
            uid: (p.info, netns_identity(p.netns_fd) if p.netns_fd is not None else None)
            for uid, p in self._pods.items()
        }

    async def wait_for_ztunnel(self, timeout: float = READ_WRITE_DEADLINE) -> None:
        """Wait until some ztunnel is connected and has received its snapshot."""
        assert self._changed is not None, "start() the server first"
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: any(c.snapshot_done for c in self._conns)), timeout
            )

    def upsert_pod(self, uid: str, info: WorkloadInfo, netns_fd: Optional[int]) -> None:
        """Record a pod in the cache without telling ztunnel (it will be in the next snapshot).

        The cache stores a duplicate of `netns_fd`; `None` means "netns unknown" (sent as Keep).
        """
        new_fd = os.dup(netns_fd) if netns_fd is not None else None
        old = self._pods.get(uid)
        self._pods[uid] = CachedPod(info, new_fd)
        if old is not None and old.netns_fd is not None:
            os.close(old.netns_fd)

    # ------------------------------------------------------------------ requests
    async def add_pod(self, uid: str, info: WorkloadInfo, netns_fd: int) -> WorkloadResponse:
        """Cache the pod and send AddWorkload + netns fd to the LATEST ztunnel; return its ack.

        Raises ZtunnelUnavailable when no ztunnel is connected (or it went away, or did not
        ack in time: AckTimeout). The pod stays cached, so the next snapshot carries it.
        A NACK is returned (``resp.ok`` is False), not raised.
        """
        self.upsert_pod(uid, info, netns_fd)
        if not self._conns:
            self._emit({"kind": "zds.add", "uid": uid, "pod": _pod_name(info), "ack": "unavailable",
                        "error": "no ztunnel connection"})
            raise ZtunnelUnavailable("no ztunnel connection")
        conn = self._conns[-1]
        return await self._request(conn, AddWorkload(uid, info), netns_fd, snapshot=False)

    async def del_pod(self, uid: str) -> list[WorkloadResponse]:
        """Forget the pod and send DelWorkload to EVERY connected ztunnel; return their acks.

        Istio broadcasts deletes so that an old ztunnel still draining during an upgrade
        also lets go of the pod. Ztunnels that fail to answer are logged and skipped.
        """
        old = self._pods.pop(uid, None)
        if old is not None and old.netns_fd is not None:
            os.close(old.netns_fd)
        if not self._conns:
            self._emit({"kind": "zds.del", "uid": uid, "ack": "unavailable", "error": "no ztunnel connection"})
            return []
        results = await asyncio.gather(
            *(self._request(c, DelWorkload(uid), None, snapshot=False) for c in list(self._conns)),
            return_exceptions=True,
        )
        acks: list[WorkloadResponse] = []
        for r in results:
            if isinstance(r, WorkloadResponse):
                acks.append(r)
            elif isinstance(r, ZtunnelUnavailable):
                log.warning("delete of %s not acknowledged: %s", uid, r)
            else:
                raise r  # a bug, not a ZDS condition
        return acks

    # ------------------------------------------------------------------ internals
    def _emit(self, event: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # an observer must never break the protocol
            log.exception("on_event callback failed for %r", event)

    async def _request(self, conn: _Connection, msg: WorkloadRequest, fd: Optional[int], *, snapshot: bool) -> WorkloadResponse:
        async with conn.lock:
            return await self._exchange(conn, msg, fd, snapshot=snapshot)

    async def _exchange(self, conn: _Connection, msg: WorkloadRequest, fd: Optional[int], *, snapshot: bool) -> WorkloadResponse:
        """Send one request and wait for its ack; the caller holds `conn.lock`. Emits one event."""
        event: dict[str, Any] = {"conn": conn.id, "message": message_text(msg)}
        if isinstance(msg, AddWorkload):
            assert fd is not None
            event.update(kind="zds.add", uid=msg.uid, pod=_pod_name(msg.workload_info),
                         service_account=msg.workload_info.service_account,
                         netns_inode=netns_identity(fd)[1])
        elif isinstance(msg, KeepWorkload):
            cached = self._pods.get(msg.uid)
            event.update(kind="zds.keep", uid=msg.uid, pod=_pod_name(cached.info if cached else None))
        elif isinstance(msg, DelWorkload):
            event.update(kind="zds.del", uid=msg.uid)
        else:
            event.update(kind="zds.snapshot_sent", pods=len(self._pods))
        if snapshot or isinstance(msg, SnapshotSent):
            event["snapshot"] = True

        try:
            if conn.closed.is_set():
                raise ZtunnelUnavailable(f"ztunnel connection {conn.id} is closed")
            pending = conn.pending = asyncio.get_running_loop().create_future()
            try:
                await send_msg_async(conn.sock, msg, [fd] if fd is not None else [])
            except OSError as e:  # EPIPE/ECONNRESET: this ztunnel is gone
                conn.pending = None
                self._drop(conn)
                raise ZtunnelUnavailable(f"ztunnel connection {conn.id} broken: {e}") from e
            try:
                resp = await asyncio.wait_for(pending, self.ack_timeout)
            except asyncio.TimeoutError:
                log.warning("timed out waiting for valid ztunnel response to %s", event["message"])
                raise AckTimeout(f"ztunnel did not ack within {self.ack_timeout:g}s") from None
        except AckTimeout as e:
            event.update(ack="timeout", error=str(e))
            self._emit(event)
            raise
        except ZtunnelUnavailable as e:
            event.update(ack="lost", error=str(e))
            self._emit(event)
            raise
        finally:
            conn.pending = None
        if resp.ok:
            event["ack"] = "ok"
        else:
            log.error("ztunnel responded with an ack error: %s", resp.ack_error)
            event.update(ack="nack", error=resp.ack_error)
        self._emit(event)
        return resp

    def _drop(self, conn: _Connection) -> None:
        """Mark a connection dead: pending requests fail with ZtunnelUnavailable."""
        if conn.closed.is_set():
            return
        conn.closed.set()
        if conn.pending is not None and not conn.pending.done():
            conn.pending.set_exception(ZtunnelUnavailable(f"ztunnel connection {conn.id} closed"))
        if not conn.hello.done():
            conn.hello.set_exception(ZdsClosed("closed before hello"))
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            sock.setblocking(False)
            conn = _Connection(id=next(self._ids), sock=sock)
            task = asyncio.create_task(self._handle_conn(conn), name=f"zds-conn {conn.id}")
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _handle_conn(self, conn: _Connection) -> None:
        """One ztunnel connection: Hello, snapshot, SnapshotSent, then serve add/del until EOF."""
        # Registered before the Hello, as in Istio: add_pod may pick this connection at once,
        # and then waits on the lock until the snapshot is through.
        await conn.lock.acquire()  # fresh lock: never suspends
        reader = asyncio.create_task(self._read_loop(conn), name=f"zds-read {conn.id}")
        self._conns.append(conn)
        log.info("new ztunnel connected (conn %d), total connected %d", conn.id, len(self._conns))
        self._emit({"kind": "zds.connected", "conn": conn.id, "connections": len(self._conns)})
        try:
            try:
                hello = await asyncio.wait_for(conn.hello, self.ack_timeout)
            except (asyncio.TimeoutError, ZdsClosed) as e:
                log.error("no hello from ztunnel on conn %d: %r", conn.id, e)
                return
            log.info("received hello from ztunnel (conn %d, version %s)", conn.id, hello.version)
            self._emit({"kind": "zds.hello", "conn": conn.id, "version": hello.version,
                        "message": message_text(hello)})
            try:
                await self._send_snapshot(conn)
            except ZtunnelUnavailable as e:
                log.error("failed to send snapshot to ztunnel (conn %d): %s", conn.id, e)
                return
            conn.snapshot_done = True
            await self._notify()
            conn.lock.release()
            await conn.closed.wait()
        finally:
            if conn.lock.locked() and not conn.snapshot_done:
                conn.lock.release()
            self._drop(conn)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if conn in self._conns:
                self._conns.remove(conn)
            conn.sock.close()
            log.info("ztunnel disconnected (conn %d), total connected %d", conn.id, len(self._conns))
            self._emit({"kind": "zds.disconnected", "conn": conn.id, "connections": len(self._conns)})
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                await self._notify()

    async def _send_snapshot(self, conn: _Connection) -> None:
        """Every cached pod as Add (+fd) or Keep, one ack at a time, then SnapshotSent.

        A NACK is logged and the snapshot goes on; a timeout or a lost connection ends it
        (and the connection), as in Istio's sendSnapshot.
        """
        for uid in list(self._pods):
            pod = self._pods.get(uid)
            if pod is None:  # deleted meanwhile
                continue
            if pod.netns_fd is None:
                await self._exchange(conn, KeepWorkload(uid), None, snapshot=True)
                continue
            fd = os.dup(pod.netns_fd)  # del_pod may close the cached fd while we wait to send
            try:
                await self._exchange(conn, AddWorkload(uid, pod.info), fd, snapshot=True)
            finally:
                os.close(fd)
        await self._exchange(conn, SnapshotSent(), None, snapshot=True)

    async def _read_loop(self, conn: _Connection) -> None:
        """The only reader of a connection: Hello and acks go to whoever waits; the rest is refused."""
        try:
            while True:
                try:
                    msg, fds = await recv_msg_async(conn.sock)
                except ZdsError as e:
                    self._refuse(conn, str(e))
                    continue
                for fd in fds:  # ztunnel never sends fds; recv_msg only lets them through on Add
                    os.close(fd)
                if isinstance(msg, ZdsHello) and not conn.hello.done():
                    conn.hello.set_result(msg)
                elif isinstance(msg, WorkloadResponse) and conn.pending is not None and not conn.pending.done():
                    conn.pending.set_result(msg)
                elif isinstance(msg, WorkloadResponse):
                    self._refuse(conn, f"unexpected ack, no request outstanding: {message_text(msg)}")
                else:
                    self._refuse(conn, f"unexpected message from ztunnel: {message_text(msg)}")
        except (ZdsClosed, OSError) as e:
            log.info("ztunnel connection %d ended: %s", conn.id, e)
        finally:
            self._drop(conn)

    def _refuse(self, conn: _Connection, error: str) -> None:
        log.warning("refused ZDS packet from ztunnel (conn %d): %s", conn.id, error)
        self._emit({"kind": "zds.refused", "conn": conn.id, "error": error})
