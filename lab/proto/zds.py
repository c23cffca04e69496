"""ZDS, the "ztunnel discovery service": messages and framing.

The istio-cni node agent and ztunnel talk over a unix SOCK_SEQPACKET socket
(`/var/run/ztunnel/ztunnel.sock` in a real cluster). The agent hands ztunnel the
network namespace of every meshed pod as a file descriptor, so that ztunnel can open
its listeners *inside* the pod (ambient "in-pod" mode).

Real counterparts, to read beside this file:
- zt:proto/zds.proto           the messages (here: the dataclasses below);
- zt:src/inpod/packet.rs       the SOCK_SEQPACKET connection;
- zt:src/inpod/protocol.rs     recvmsg with MSG_CMSG_CLOEXEC, fd checks, ack/nack;
- is:cni/pkg/nodeagent/ztunnelserver.go   the agent side (`unix.UnixRights(fd)`).

Differences, on purpose: the real protocol is protobuf; the lab encodes every message as
one line of readable JSON so that a learner can read the packets (``tcpdump`` cannot
see unix sockets, but the lab's event stream carries the text). Everything else is the
same: one message per packet, a 1024-byte read buffer, the netns fd as SCM_RIGHTS
ancillary data (only with AddWorkload), MSG_TRUNC / MSG_CTRUNC treated as errors.

Wire examples::

    {"type": "hello", "version": "V1"}                                   ztunnel -> agent
    {"type": "add", "uid": "...", "workload_info": {"name": "...",
        "namespace": "...", "service_account": "..."}}     + netns fd    agent -> ztunnel
    {"type": "keep", "uid": "..."}                                       agent -> ztunnel
    {"type": "del", "uid": "..."}                                        agent -> ztunnel
    {"type": "snapshot_sent"}                                            agent -> ztunnel
    {"type": "ack", "error": ""}          (non-empty error = NACK)       ztunnel -> agent
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Union

#: ztunnel reads every ZDS packet into a 1024-byte buffer (zt:src/inpod/protocol.rs).
MAX_PACKET = 1024
#: The only protocol version (zds.proto `Version.V1`).
ZDS_VERSION = "V1"
#: Room for this many fds in the receive buffer: one is legal, a few more let us see
#: (and close) what a buggy peer sent instead of getting MSG_CTRUNC straight away.
_FD_ROOM = 4
_INT_SIZE = array.array("i").itemsize


class ZdsError(Exception):
    """A ZDS packet was refused (malformed, truncated, unknown, wrong fds).

    The offending packet has been consumed and any fd it carried closed, so the
    connection itself is still usable.
    """


class ZdsClosed(ConnectionError):
    """The peer closed the ZDS connection (recvmsg returned 0 bytes)."""


# --------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class ZdsHello:
    """First message on a connection, ztunnel -> agent (zds.proto `ZdsHello`)."""

    version: str = ZDS_VERSION


@dataclass(frozen=True)
class WorkloadInfo:
    """Who the pod is (zds.proto `WorkloadInfo`): ztunnel matches it to its xDS workload."""

    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class AddWorkload:
    """Start (or keep) the in-pod proxy of pod `uid`; the netns fd rides along as SCM_RIGHTS."""

    uid: str
    workload_info: WorkloadInfo


@dataclass(frozen=True)
class KeepWorkload:
    """Snapshot only: the agent knows pod `uid` but has no netns for it; keep its proxy."""

    uid: str


@dataclass(frozen=True)
class DelWorkload:
    """Pod `uid` left the mesh (or was deleted): ztunnel drains its proxy."""

    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    """End of the snapshot: ztunnel drains every proxy the snapshot did not mention."""


@dataclass(frozen=True)
class WorkloadResponse:
    """ztunnel's answer to every request (zds.proto `WorkloadResponse{ack{error}}`).

    An empty `ack_error` is an ACK; a non-empty one is a NACK carrying the reason.
    """

    ack_error: str = ""

    @property
    def ok(self) -> bool:
        return self.ack_error == ""


WorkloadRequest = Union[AddWorkload, KeepWorkload, DelWorkload, SnapshotSent]
ZdsMessage = Union[ZdsHello, WorkloadRequest, WorkloadResponse]


# --------------------------------------------------------------------------- encoding
def to_wire_dict(msg: ZdsMessage) -> dict[str, Any]:
    """The JSON object a message becomes on the wire (pure)."""
    if isinstance(msg, ZdsHello):
        return {"type": "hello", "version": msg.version}
    if isinstance(msg, AddWorkload):
        info = msg.workload_info
        return {
            "type": "add",
            "uid": msg.uid,
            "workload_info": {
                "name": info.name,
                "namespace": info.namespace,
                "service_account": info.service_account,
            },
        }
    if isinstance(msg, KeepWorkload):
        return {"type": "keep", "uid": msg.uid}
    if isinstance(msg, DelWorkload):
        return {"type": "del", "uid": msg.uid}
    if isinstance(msg, SnapshotSent):
        return {"type": "snapshot_sent"}
    if isinstance(msg, WorkloadResponse):
        return {"type": "ack", "error": msg.ack_error}
    raise ZdsError(f"not a ZDS message: {msg!r}")


def encode(msg: ZdsMessage) -> bytes:
    """Encode one message as one packet of readable JSON; refuse more than MAX_PACKET bytes."""
    data = json.dumps(to_wire_dict(msg), ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_PACKET:
        raise ZdsError(f"message is {len(data)} bytes, larger than the {MAX_PACKET}-byte ZDS packet")
    return data


def _check_keys(obj: dict[str, Any], kind: str, keys: Iterable[str]) -> None:
    """Refuse fields that a message of this `kind` does not have (catches typos)."""
    extra = sorted(set(obj) - set(keys) - {"type"})
    if extra:
        raise ZdsError(f"{kind!r} message has unexpected field(s) {extra}")


def _str(obj: dict[str, Any], kind: str, key: str, *, non_empty: bool = False) -> str:
    """A required string field."""
    if key not in obj:
        raise ZdsError(f"{kind!r} message is missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ZdsError(f"{kind!r} message field {key!r} must be a string")
    if non_empty and not value:
        raise ZdsError(f"{kind!r} message has an empty {key!r}")
    return value


def from_wire_dict(obj: Any) -> ZdsMessage:
    """Turn a decoded JSON value back into a message, or raise ZdsError (pure)."""
    if not isinstance(obj, dict):
        raise ZdsError("ZDS message must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ZdsError("ZDS message has no string 'type'")
    if kind == "hello":
        _check_keys(obj, kind, ["version"])
        return ZdsHello(version=_str(obj, kind, "version", non_empty=True))
    if kind == "add":
        _check_keys(obj, kind, ["uid", "workload_info"])
        uid = _str(obj, kind, "uid", non_empty=True)
        info = obj.get("workload_info")
        if not isinstance(info, dict):
            raise ZdsError("'add' message needs a 'workload_info' object")
        _check_keys(info, "workload_info", ["name", "namespace", "service_account"])
        return AddWorkload(
            uid,
            WorkloadInfo(
                name=_str(info, "workload_info", "name"),
                namespace=_str(info, "workload_info", "namespace"),
                service_account=_str(info, "workload_info", "service_account"),
            ),
        )
    if kind in ("keep", "del"):
        _check_keys(obj, kind, ["uid"])
        uid = _str(obj, kind, "uid", non_empty=True)
        return KeepWorkload(uid) if kind == "keep" else DelWorkload(uid)
    if kind == "snapshot_sent":
        _check_keys(obj, kind, [])
        return SnapshotSent()
    if kind == "ack":
        _check_keys(obj, kind, ["error"])
        return WorkloadResponse(ack_error=_str(obj, kind, "error"))
    raise ZdsError(f"unknown ZDS message type {kind!r}")


def decode(data: bytes) -> ZdsMessage:
    """Decode one packet; raise ZdsError on oversize, non-UTF-8, bad JSON or unknown message."""
    if len(data) > MAX_PACKET:
        raise ZdsError(f"packet is {len(data)} bytes, larger than the {MAX_PACKET}-byte ZDS packet")
    if not data:
        raise ZdsError("empty ZDS packet")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ZdsError(f"ZDS packet is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise ZdsError(f"malformed or truncated ZDS message (bad JSON: {e})") from None
    return from_wire_dict(obj)


def message_text(msg: ZdsMessage) -> str:
    """The wire text of a message, for logs and the lab's event stream."""
    return encode(msg).decode("utf-8")


def check_fds(msg: ZdsMessage, nfds: int) -> None:
    """The fd rule of zt:src/inpod/protocol.rs: AddWorkload carries exactly one fd, nothing else any."""
    if isinstance(msg, AddWorkload):
        if nfds != 1:
            raise ZdsError(f"AddWorkload must carry exactly one netns fd, got {nfds}")
    elif nfds:
        raise ZdsError(f"unexpected fd(s) with a {to_wire_dict(msg)['type']!r} message")


def netns_identity(fd: int) -> tuple[int, int]:
    """Identity of a network namespace: (st_dev, st_ino) of its fd, as ztunnel compares them.

    Two fds name the same netns iff these match; an Add with a new identity for a known
    pod means the pod got a new netns, so ztunnel replaces its proxy.
    """
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


# --------------------------------------------------------------------------- socket I/O
def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _rights(msg: ZdsMessage, fds: Iterable[int]) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    fds = list(fds)
    check_fds(msg, len(fds))
    data = encode(msg)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    return data, anc


def _sendmsg(sock: socket.socket, data: bytes, anc: list[tuple[int, int, bytes]]) -> None:
    sent = sock.sendmsg([data], anc)
    if sent != len(data):  # cannot happen on SOCK_SEQPACKET, which sends whole records
        raise ZdsError(f"short send: {sent} of {len(data)} bytes")


def send_msg(sock: socket.socket, msg: ZdsMessage, fds: Iterable[int] = ()) -> None:
    """Send one message as one packet, with the netns fd as SCM_RIGHTS (AddWorkload only).

    The caller keeps its fd: the kernel installs a duplicate in the receiver.
    """
    data, anc = _rights(msg, fds)
    _sendmsg(sock, data, anc)


def _recvmsg(sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
    data, anc, flags, _addr = sock.recvmsg(
        MAX_PACKET, socket.CMSG_SPACE(_FD_ROOM * _INT_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    return data, anc, flags


def parse_received(data: bytes, anc: list[tuple[int, int, bytes]], flags: int) -> tuple[ZdsMessage, list[int]]:
    """Validate one received packet (bytes + ancillary data + recvmsg flags).

    Every fd received is either returned to the caller (who then owns it) or closed
    before ZdsError is raised, so a refused packet never leaks a descriptor.
    """
    fds: list[int] = []
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % _INT_SIZE
            fds.extend(array.array("i", cdata[:usable]))
    try:
        if flags & socket.MSG_TRUNC:
            raise ZdsError(f"received truncated message (packet larger than {MAX_PACKET} bytes)")
        if flags & socket.MSG_CTRUNC:
            raise ZdsError("received truncated message (ancillary data / fds truncated)")
        if not data:
            if fds:
                raise ZdsError("empty packet carrying fds")
            raise ZdsClosed("ZDS peer closed the connection")
        msg = decode(data)
        check_fds(msg, len(fds))
    except BaseException:
        _close_all(fds)
        raise
    return msg, fds


def recv_msg(sock: socket.socket) -> tuple[ZdsMessage, list[int]]:
    """Receive one packet: (message, fds). Raises ZdsError (refused, connection usable) or ZdsClosed.

    Uses recvmsg with MSG_CMSG_CLOEXEC, like ztunnel, so received netns fds are never
    inherited by child processes. A zero-length read is end of stream, as in ztunnel.
    """
    return parse_received(*_recvmsg(sock))


# --------------------------------------------------------------------------- asyncio
def _require_nonblocking(sock: socket.socket) -> None:
    if sock.gettimeout() != 0.0:
        raise ValueError("the socket must be non-blocking (sock.setblocking(False))")


async def _wait_ready(sock: socket.socket, *, write: bool) -> None:
    """Wait until `sock` is readable/writable without blocking the event loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def send_msg_async(sock: socket.socket, msg: ZdsMessage, fds: Iterable[int] = ()) -> None:
    """send_msg for asyncio: a non-blocking socket, waiting for writability via the loop."""
    _require_nonblocking(sock)
    data, anc = _rights(msg, fds)
    while True:
        try:
            _sendmsg(sock, data, anc)
            return
        except (BlockingIOError, InterruptedError):
            await _wait_ready(sock, write=True)


async def recv_msg_async(sock: socket.socket) -> tuple[ZdsMessage, list[int]]:
    """recv_msg for asyncio: waits for readability with loop.add_reader, then recvmsg.

    asyncio's own loop.sock_recv cannot return ancillary data, hence this helper.
    Only one coroutine may read a given socket at a time.
    """
    _require_nonblocking(sock)
    while True:
        try:
            raw = _recvmsg(sock)
        except (BlockingIOError, InterruptedError):
            await _wait_ready(sock, write=False)
            continue
        return parse_received(*raw)
