"""ztunnel's side of ZDS: receive pods (and their netns fds) from the istio-cni node agent.

Real counterparts: zt:src/inpod/workloadmanager.rs (connect loop, backoff, readiness),
zt:src/inpod/protocol.rs (read a message, send ack/nack), zt:src/inpod/statemanager.rs
(what to do with each message; here the `on_*` handlers).

ztunnel connects to the agent's unix SOCK_SEQPACKET socket, sends ``ZdsHello`` and then
answers every request with an ack (empty error) or a NACK (the error text):

- ``AddWorkload`` + fd -> ``on_add(uid, info, netns_fd)``: start the pod's in-pod proxy.
  On success the handler OWNS the fd (ztunnel keeps it to open sockets in the pod for the
  proxy's lifetime); if the handler raises, the fd is closed here and a NACK is sent.
- ``KeepWorkload`` -> ``on_keep(uid)``: keep that proxy although the agent has no netns.
- ``DelWorkload`` -> ``on_del(uid)``: drain the proxy.
- ``SnapshotSent`` -> ``on_snapshot_sent(known_uids)``: drain every proxy the snapshot did
  not mention, then become ready.

As in ztunnel, a packet it cannot read is NACKed and the stream is ended (then
reconnected), and readiness is lost while disconnected. Handlers may be plain functions
or coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lab.proto.zds import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadResponse,
    ZdsClosed,
    ZdsError,
    ZdsHello,
    message_text,
    netns_identity,
    recv_msg_async,
    send_msg_async,
)

__all__ = ["INITIAL_BACKOFF", "MAX_BACKOFF", "WorkloadManager", "netns_identity"]

log = logging.getLogger(__name__)

#: zt:src/inpod/workloadmanager.rs: the backoff starts at 10 ms and is doubled before each
#: sleep (so the first wait is 20 ms), capped at 15 s.
INITIAL_BACKOFF = 0.010
MAX_BACKOFF = 15.0

AddHandler = Callable[[str, WorkloadInfo, int], Awaitable[None] | None]
UidHandler = Callable[[str], Awaitable[None] | None]
SnapshotHandler = Callable[[frozenset[str]], Awaitable[None] | None]


async def _call(handler: Callable[..., Any] | None, *args: Any) -> None:
    if handler is None:
        return
    result = handler(*args)
    if inspect.isawaitable(result):
        await result


def next_backoff(current: float, maximum: float = MAX_BACKOFF) -> float:
    """ztunnel's reconnect backoff step: double, but never more than `maximum` (pure)."""
    return min(maximum, current * 2)


class WorkloadManager:
    """Connects to the node agent, receives pods, acks them; reconnects forever with backoff.

    ``ready`` is set once a snapshot has been fully received on the current connection
    and cleared when the connection is lost (ztunnel's "workload proxy manager" readiness
    task). ``retry_delays`` records each backoff slept, for learners and tests.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        on_add: AddHandler,
        on_del: UidHandler | None = None,
        on_keep: UidHandler | None = None,
        on_snapshot_sent: SnapshotHandler | None = None,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.on_add = on_add
        self.on_del = on_del
        self.on_keep = on_keep
        self.on_snapshot_sent = on_snapshot_sent
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.ready = asyncio.Event()
        self.connected = asyncio.Event()
        self.retry_delays: list[float] = []
        self.connect_attempts: list[float] = []  # time.monotonic() of every connect attempt
        self.connections = 0  # successful connects so far
        self.snapshots = 0  # snapshots fully received so far
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> asyncio.Task[None]:
        """Run the manager in a background task (see `run`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"zds-client {self.socket_path}")
        return self._task

    async def stop(self) -> None:
        """Stop the background task and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Connect, process one stream until it ends, reconnect: until cancelled."""
        while True:
            sock = await self._connect()
            self.connections += 1
            log.info("handling new stream")
            self.connected.set()
            try:
                await self._process(sock)
                log.info("process stream ended with eof")
            except (ZdsError, OSError) as e:
                log.info("process stream ended: %s", e)
            finally:
                sock.close()
                self.connected.clear()
                if self.ready.is_set():
                    log.debug("workload proxy manager is NOT ready")
                self.ready.clear()

    async def _connect(self) -> socket.socket:
        """Connect to the agent's socket, retrying with exponential backoff (10 ms .. 15 s)."""
        loop = asyncio.get_running_loop()
        backoff = self.initial_backoff
        log.debug("connecting to server: %s", self.socket_path)
        while True:
            self.connect_attempts.append(time.monotonic())
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.socket_path)
                return sock
            except OSError as e:
                sock.close()
                backoff = next_backoff(backoff, self.max_backoff)
                log.warning(
                    "failed to connect to the Istio CNI node agent over %r, is the node agent healthy? "
                    "details: %s. retrying in %s",
                    self.socket_path, e, _fmt_duration(backoff),
                )
                self.retry_delays.append(backoff)
                await asyncio.sleep(backoff)
            except BaseException:
                sock.close()
                raise

    # ------------------------------------------------------------------ one stream
    async def _process(self, sock: socket.socket) -> None:
        """Hello, then one ack per request until EOF. Returns on EOF; raises to reconnect."""
        await send_msg_async(sock, ZdsHello())
        known: set[str] = set()
        while True:
            try:
                msg, fds = await recv_msg_async(sock)
            except ZdsClosed:
                return
            except ZdsError as e:
                log.error("failed to read message: %s", e)
                await self._send_response(sock, WorkloadResponse(f"failure to read message: {e}"))
                raise
            error = await self._handle(msg, fds, known)
            if error:
                log.error("failed to process message %s: %s", message_text(msg), error)
            await self._send_response(sock, WorkloadResponse(error))
            if isinstance(msg, (ZdsHello, WorkloadResponse)):  # not a request: protocol error
                raise ZdsError(f"unexpected message from the node agent: {message_text(msg)}")

    async def _handle(self, msg: Any, fds: list[int], known: set[str]) -> str:
        """Dispatch one request to the handlers; return "" (ACK) or the NACK text."""
        try:
            if isinstance(msg, AddWorkload):
                (fd,) = fds
                known.add(msg.uid)
                try:
                    await _call(self.on_add, msg.uid, msg.workload_info, fd)
                except BaseException:
                    os.close(fd)  # not taken over by the handler
                    raise
            elif isinstance(msg, KeepWorkload):
                known.add(msg.uid)
                await _call(self.on_keep, msg.uid)
            elif isinstance(msg, DelWorkload):
                known.discard(msg.uid)
                await _call(self.on_del, msg.uid)
            elif isinstance(msg, SnapshotSent):
                await _call(self.on_snapshot_sent, frozenset(known))
                self.snapshots += 1
                if not self.ready.is_set():
                    log.debug("workload proxy manager is ready")
                self.ready.set()
            else:
                return f"unexpected message: {message_text(msg)}"
        except Exception as e:
            return str(e) or type(e).__name__
        return ""

    async def _send_response(self, sock: socket.socket, resp: WorkloadResponse) -> None:
        await send_msg_async(sock, resp)


def _fmt_duration(seconds: float) -> str:
    """Rust's Debug format of a Duration, roughly: 20ms, 1.28s, 15s."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
