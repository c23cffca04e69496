"""ZDS: framing, fd passing, the node agent's server and ztunnel's workload manager.

No root needed: socketpair(AF_UNIX, SOCK_SEQPACKET) and a server on a short tmp path.
The "netns" fds are real: /proc/self/ns/net (our own netns) and temp files.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from lab.cni.ztunnel_server import AckTimeout, ZtunnelServer, ZtunnelUnavailable
from lab.proto import zds
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
)
from lab.ztunnel.inpod.workload_manager import WorkloadManager, netns_identity, next_backoff

INFO = WorkloadInfo(name="productpage-v1-abc", namespace="default", service_account="bookinfo-productpage")
ALL_MESSAGES = [
    ZdsHello(),
    AddWorkload("uid-1", INFO),
    KeepWorkload("uid-2"),
    DelWorkload("uid-3"),
    SnapshotSent(),
    WorkloadResponse(),
    WorkloadResponse("failure to start proxy: address in use"),
]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def sock_path():
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be too long.
    d = tempfile.mkdtemp(prefix="zds-", dir="/tmp")
    yield os.path.join(d, "ztunnel.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def netns_fd():
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def temp_fd(tmp_path: Path):
    fd = os.open(tmp_path / "fake-netns", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    yield fd
    os.close(fd)


# --------------------------------------------------------------------------- framing
@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_encode_decode_round_trip(msg):
    data = zds.encode(msg)
    assert len(data) <= zds.MAX_PACKET
    assert zds.decode(data) == msg


def test_wire_format_is_readable_json():
    obj = json.loads(zds.encode(AddWorkload("uid-1", INFO)))
    assert obj == {
        "type": "add",
        "uid": "uid-1",
        "workload_info": {"name": INFO.name, "namespace": "default", "service_account": "bookinfo-productpage"},
    }
    assert json.loads(zds.encode(WorkloadResponse("boom"))) == {"type": "ack", "error": "boom"}
    assert WorkloadResponse().ok and not WorkloadResponse("boom").ok


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_socket_round_trip(pair, msg, netns_fd):
    a, b = pair
    fds = [netns_fd] if isinstance(msg, AddWorkload) else []
    zds.send_msg(a, msg, fds)
    got, got_fds = zds.recv_msg(b)
    assert got == msg
    assert len(got_fds) == len(fds)
    for fd in got_fds:
        os.close(fd)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"{not json", "bad JSON"),
        (zds.encode(AddWorkload("uid-1", INFO))[:-7], "bad JSON"),  # truncated
        (b'{"type": "bogus"}', "unknown ZDS message type"),
        (b'["add"]', "JSON object"),
        (b'{"uid": "x"}', "no string 'type'"),
        (b'{"type": "del"}', "missing field 'uid'"),
        (b'{"type": "del", "uid": 7}', "must be a string"),
        (b'{"type": "del", "uid": ""}', "empty 'uid'"),
        (b'{"type": "keep", "uid": "x", "extra": 1}', "unexpected field"),
        (b'{"type": "add", "uid": "x", "workload_info": "nope"}', "workload_info"),
        (b"\xff\xfe", "not UTF-8"),
        (b"x" * (zds.MAX_PACKET + 1), "larger than"),
    ],
)
def test_decode_refuses(data, error):
    with pytest.raises(ZdsError, match=error):
        zds.decode(data)


def test_encode_refuses_oversize():
    big = AddWorkload("uid", WorkloadInfo(name="p" * 1100, namespace="default", service_account="sa"))
    with pytest.raises(ZdsError, match="larger than the 1024-byte"):
        zds.encode(big)


def test_send_refuses_wrong_fds(pair, temp_fd):
    a, _ = pair
    with pytest.raises(ZdsError, match="exactly one netns fd"):
        zds.send_msg(a, AddWorkload("uid", INFO))
    with pytest.raises(ZdsError, match="unexpected fd"):
        zds.send_msg(a, DelWorkload("uid"), [temp_fd])


def test_refused_packets_keep_the_connection_working(pair, temp_fd):
    """Malformed, unknown, oversize packets and wrong fds are refused one by one; nothing leaks."""
    a, b = pair
    before = open_fds()
    bad_fd_packets = [
        # (payload, fds): Add without its fd, Del with one, Add with two.
        (zds.encode(AddWorkload("u", INFO)), []),
        (zds.encode(DelWorkload("u")), [temp_fd]),
        (zds.encode(AddWorkload("u", INFO)), [temp_fd, temp_fd]),
    ]
    a.send(b"{not json")
    a.send(b'{"type": "bogus"}')
    a.send(b"{" + b" " * 2000 + b"}")  # oversize: MSG_TRUNC
    a.send(zds.encode(KeepWorkload("uid-9"))[:-3])  # truncated
    for payload, fds in bad_fd_packets:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        a.sendmsg([payload], anc)
    errors = []
    for _ in range(4 + len(bad_fd_packets)):
        with pytest.raises(ZdsError) as e:
            zds.recv_msg(b)
        errors.append(str(e.value))
    assert "bad JSON" in errors[0]
    assert "unknown ZDS message type" in errors[1]
    assert "truncated message" in errors[2]
    assert "bad JSON" in errors[3]
    assert "exactly one netns fd, got 0" in errors[4]
    assert "unexpected fd" in errors[5]
    assert "exactly one netns fd, got 2" in errors[6]
    # the fds of refused packets were closed
    assert open_fds() == before
    # and the connection still works
    zds.send_msg(a, KeepWorkload("uid-ok"))
    assert zds.recv_msg(b) == (KeepWorkload("uid-ok"), [])


def test_eof_is_zds_closed(pair):
    a, b = pair
    a.close()
    with pytest.raises(ZdsClosed):
        zds.recv_msg(b)


# --------------------------------------------------------------------------- fd passing
def test_fd_passing_preserves_netns_identity(pair, netns_fd):
    a, b = pair
    zds.send_msg(a, AddWorkload("uid-1", INFO), [netns_fd])
    msg, (fd,) = zds.recv_msg(b)
    try:
        assert msg == AddWorkload("uid-1", INFO)
        assert fd != netns_fd
        assert netns_identity(fd) == netns_identity(netns_fd)
        st = os.stat("/proc/self/ns/net")
        assert netns_identity(fd) == (st.st_dev, st.st_ino)
        assert not os.get_inheritable(fd)  # MSG_CMSG_CLOEXEC
    finally:
        os.close(fd)


def test_fd_passing_temp_file(pair, temp_fd, tmp_path):
    a, b = pair
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        zds.send_msg(a, AddWorkload("uid-1", INFO), [temp_fd])
        _, (fd,) = zds.recv_msg(b)
        assert netns_identity(fd) == netns_identity(temp_fd)
        assert netns_identity(fd) != netns_identity(other)
        os.write(fd, b"same file")
        assert os.pread(temp_fd, 9, 0) == b"same file"
        os.close(fd)
    finally:
        os.close(other)


async def test_async_variants_do_not_block_the_loop(pair, netns_fd):
    a, b = pair
    a.setblocking(False)
    b.setblocking(False)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    t = asyncio.create_task(ticker())
    receiver = asyncio.create_task(zds.recv_msg_async(b))
    await asyncio.sleep(0.1)  # the receiver waits: the ticker must keep running
    assert not receiver.done() and ticks >= 5
    await zds.send_msg_async(a, AddWorkload("uid-1", INFO), [netns_fd])
    msg, (fd,) = await asyncio.wait_for(receiver, 1)
    assert msg.uid == "uid-1" and netns_identity(fd) == netns_identity(netns_fd)
    os.close(fd)
    t.cancel()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as blocking:
        with pytest.raises(ValueError, match="non-blocking"):
            await zds.recv_msg_async(blocking)


# --------------------------------------------------------------------------- server + manager
class Ztunnel:
    """A recording ztunnel: the real WorkloadManager with handlers that keep what they get."""

    def __init__(self, path: str, *, fail_add: str = "") -> None:
        self.adds: list[tuple[str, WorkloadInfo, tuple[int, int]]] = []
        self.keeps: list[str] = []
        self.dels: list[str] = []
        self.snapshots: list[frozenset[str]] = []
        self.fds: dict[str, int] = {}
        self.fail_add = fail_add
        self.manager = WorkloadManager(
            path, on_add=self.on_add, on_del=self.on_del, on_keep=self.on_keep,
            on_snapshot_sent=self.on_snapshot_sent,
        )

    async def on_add(self, uid, info, fd):
        if self.fail_add:
            raise RuntimeError(self.fail_add)
        self.adds.append((uid, info, netns_identity(fd)))
        old = self.fds.pop(uid, None)
        if old is not None:
            os.close(old)
        self.fds[uid] = fd  # the proxy owns its netns fd

    def on_del(self, uid):
        self.dels.append(uid)
        fd = self.fds.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def on_keep(self, uid):
        self.keeps.append(uid)

    async def on_snapshot_sent(self, known):
        self.snapshots.append(known)
        for uid in set(self.fds) - known:  # drain proxies the snapshot did not mention
            self.on_del(uid)

    async def stop(self):
        await self.manager.stop()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


async def test_full_handshake_snapshot_add_del(sock_path, netns_fd):
    before = open_fds()
    events: list[dict] = []
    server = ZtunnelServer(sock_path, on_event=events.append)
    await server.start()
    server.upsert_pod("uid-a", INFO, netns_fd)
    server.upsert_pod("uid-b", WorkloadInfo("details-v1-x", "default", "bookinfo-details"), None)
    zt = Ztunnel(sock_path)
    zt.manager.start()
    try:
        await asyncio.wait_for(zt.manager.ready.wait(), 2)
        await server.wait_for_ztunnel(1)
        my_ns = netns_identity(netns_fd)
        assert zt.adds == [("uid-a", INFO, my_ns)]
        assert zt.keeps == ["uid-b"]
        assert zt.snapshots == [frozenset({"uid-a", "uid-b"})]
        kinds = [e["kind"] for e in events]
        assert kinds == ["zds.connected", "zds.hello", "zds.add", "zds.keep", "zds.snapshot_sent"]
        add_ev = events[2]
        assert add_ev["uid"] == "uid-a" and add_ev["pod"] == "default/productpage-v1-abc"
        assert add_ev["netns_inode"] == my_ns[1] and add_ev["ack"] == "ok" and add_ev["snapshot"]
        assert json.loads(add_ev["message"])["type"] == "add"
        assert events[3]["pod"] == "default/details-v1-x" and events[4]["ack"] == "ok"

        info_c = WorkloadInfo("ratings-v1-y", "default", "bookinfo-ratings")
        resp = await server.add_pod("uid-c", info_c, netns_fd)
        assert resp == WorkloadResponse()
        assert zt.adds[-1] == ("uid-c", info_c, my_ns)
        assert events[-1]["kind"] == "zds.add" and events[-1]["ack"] == "ok" and "snapshot" not in events[-1]
        assert set(server.pods()) == {"uid-a", "uid-b", "uid-c"}

        acks = await server.del_pod("uid-c")
        assert acks == [WorkloadResponse()]
        assert zt.dels == ["uid-c"] and "uid-c" not in zt.fds
        assert events[-1] == {"kind": "zds.del", "conn": 1, "uid": "uid-c", "ack": "ok",
                              "message": '{"type": "del", "uid": "uid-c"}'}
        assert set(server.pods()) == {"uid-a", "uid-b"}
    finally:
        await zt.stop()
        await server.close()
    assert not os.path.exists(sock_path)
    assert open_fds() == before  # no fd leak: cache dups, passed fds, sockets all closed


async def test_nack_is_returned_and_fd_closed(sock_path, netns_fd):
    before = open_fds()
    events: list[dict] = []
    async with ZtunnelServer(sock_path, on_event=events.append) as server:
        zt = Ztunnel(sock_path, fail_add="failed to bind 15001: address in use")
        zt.manager.start()
        await asyncio.wait_for(zt.manager.ready.wait(), 2)
        resp = await server.add_pod("uid-x", INFO, netns_fd)
        assert not resp.ok and "address in use" in resp.ack_error
        assert events[-1]["ack"] == "nack" and "address in use" in events[-1]["error"]
        # the connection is still fine afterwards
        zt.fail_add = ""
        assert (await server.add_pod("uid-x", INFO, netns_fd)).ok
        await zt.stop()
    assert open_fds() == before


async def test_unavailable_without_ztunnel_then_in_next_snapshot(sock_path, netns_fd):
    events: list[dict] = []
    async with ZtunnelServer(sock_path, on_event=events.append) as server:
        with pytest.raises(ZtunnelUnavailable, match="no ztunnel connection"):
            await server.add_pod("uid-p", INFO, netns_fd)
        assert events[-1]["ack"] == "unavailable"
        assert await server.del_pod("uid-none") == []
        # the pod stayed cached: the caller marks it pending, and ztunnel gets it on connect
        zt = Ztunnel(sock_path)
        zt.manager.start()
        await asyncio.wait_for(zt.manager.ready.wait(), 2)
        assert [a[0] for a in zt.adds] == ["uid-p"]
        await zt.stop()


async def test_add_goes_to_latest_ztunnel_del_to_all(sock_path, netns_fd):
    async with ZtunnelServer(sock_path) as server:
        old, new = Ztunnel(sock_path), Ztunnel(sock_path)
        old.manager.start()
        await asyncio.wait_for(old.manager.ready.wait(), 2)
        new.manager.start()
        await asyncio.wait_for(new.manager.ready.wait(), 2)
        assert server.connections == 2
        assert (await server.add_pod("uid-1", INFO, netns_fd)).ok
        assert [a[0] for a in new.adds] == ["uid-1"] and old.adds == []
        assert len(await server.del_pod("uid-1")) == 2
        assert old.dels == ["uid-1"] and new.dels == ["uid-1"]
        await old.stop()
        await new.stop()


async def raw_ztunnel(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


async def test_server_refuses_malformed_from_ztunnel_and_keeps_connection(sock_path, netns_fd):
    events: list[dict] = []
    async with ZtunnelServer(sock_path, on_event=events.append) as server:
        s = await raw_ztunnel(sock_path)
        try:
            s.send(b"{garbage")
            s.send(b"{" + b" " * 3000 + b"}")
            s.send(b'{"type": "bogus"}')
            s.send(zds.encode(WorkloadResponse()))  # an ack nobody asked for
            await zds.send_msg_async(s, ZdsHello())
            msg, _ = await asyncio.wait_for(zds.recv_msg_async(s), 2)
            assert msg == SnapshotSent()
            refused = [e["error"] for e in events if e["kind"] == "zds.refused"]
            assert len(refused) == 4
            assert "bad JSON" in refused[0] and "truncated" in refused[1]
            assert "unknown" in refused[2] and "unexpected ack" in refused[3]
            # garbage instead of an ack is refused too; the real ack then still counts
            add = asyncio.create_task(server.add_pod("uid-1", INFO, netns_fd))
            await zds.send_msg_async(s, WorkloadResponse())  # ack of SnapshotSent
            msg, fds = await asyncio.wait_for(zds.recv_msg_async(s), 2)
            assert msg == AddWorkload("uid-1", INFO) and len(fds) == 1
            os.close(fds[0])
            s.send(b"not json at all")
            await zds.send_msg_async(s, WorkloadResponse())
            assert (await asyncio.wait_for(add, 2)).ok
            assert server.connections == 1
        finally:
            s.close()


async def test_ack_timeout_then_late_ack_is_refused(sock_path, netns_fd):
    events: list[dict] = []
    async with ZtunnelServer(sock_path, on_event=events.append, ack_timeout=0.2) as server:
        s = await raw_ztunnel(sock_path)
        try:
            await zds.send_msg_async(s, ZdsHello())
            assert (await zds.recv_msg_async(s))[0] == SnapshotSent()
            await zds.send_msg_async(s, WorkloadResponse())
            await server.wait_for_ztunnel(1)
            t0 = time.monotonic()
            with pytest.raises(AckTimeout):
                await server.add_pod("uid-1", INFO, netns_fd)
            assert 0.15 < time.monotonic() - t0 < 1
            assert events[-1]["ack"] == "timeout"
            _, fds = await zds.recv_msg_async(s)
            os.close(fds[0])
            await zds.send_msg_async(s, WorkloadResponse())  # too late
            await asyncio.sleep(0.05)
            assert "unexpected ack" in events[-1]["error"] and server.connections == 1
        finally:
            s.close()


async def test_ztunnel_disconnect_is_noticed(sock_path, netns_fd):
    events: list[dict] = []
    async with ZtunnelServer(sock_path, on_event=events.append) as server:
        zt = Ztunnel(sock_path)
        zt.manager.start()
        await asyncio.wait_for(zt.manager.ready.wait(), 2)
        await zt.stop()
        for _ in range(100):
            if server.connections == 0:
                break
            await asyncio.sleep(0.01)
        assert events[-1]["kind"] == "zds.disconnected"
        with pytest.raises(ZtunnelUnavailable):
            await server.add_pod("uid-1", INFO, netns_fd)


async def test_manager_nacks_unreadable_packet_and_reconnects(sock_path):
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(sock_path)
    lsock.listen()
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    zt = Ztunnel(sock_path)
    zt.manager.start()
    try:
        conn, _ = await asyncio.wait_for(loop.sock_accept(lsock), 2)
        conn.setblocking(False)
        assert (await zds.recv_msg_async(conn))[0] == ZdsHello()
        conn.send(b'{"type": "add", "uid": "u"')  # truncated
        resp, _ = await asyncio.wait_for(zds.recv_msg_async(conn), 2)
        assert isinstance(resp, WorkloadResponse) and "failure to read message" in resp.ack_error
        with pytest.raises(ZdsClosed):  # ztunnel ends that stream ...
            await asyncio.wait_for(zds.recv_msg_async(conn), 2)
        conn.close()
        conn2, _ = await asyncio.wait_for(loop.sock_accept(lsock), 2)  # ... and reconnects
        conn2.setblocking(False)
        assert (await zds.recv_msg_async(conn2))[0] == ZdsHello()
        await zds.send_msg_async(conn2, KeepWorkload("uid-k"))
        assert (await zds.recv_msg_async(conn2))[0] == WorkloadResponse()
        assert zt.keeps == ["uid-k"] and zt.manager.connections == 2
        conn2.close()
    finally:
        await zt.stop()
        lsock.close()


def test_backoff_doubles_to_fifteen_seconds():
    delays, d = [], 0.010
    for _ in range(14):
        d = next_backoff(d)
        delays.append(d)
    assert delays[:4] == [0.02, 0.04, 0.08, 0.16]
    assert delays[-1] == 15.0 and max(delays) == 15.0


async def test_reconnect_after_server_restart_with_backoff(sock_path, netns_fd, caplog):
    caplog.set_level(logging.WARNING, logger="lab.ztunnel.inpod.workload_manager")
    before = open_fds()
    zt = Ztunnel(sock_path)
    zt.manager.start()  # no server yet: the manager backs off
    try:
        await asyncio.sleep(0.25)
        assert zt.manager.retry_delays[:3] == [0.02, 0.04, 0.08]
        attempts = zt.manager.connect_attempts
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        assert all(g >= d * 0.9 for g, d in zip(gaps, zt.manager.retry_delays))
        assert "failed to connect to the Istio CNI node agent" in caplog.text

        server = ZtunnelServer(sock_path)
        await server.start()
        server.upsert_pod("uid-a", INFO, netns_fd)
        await asyncio.wait_for(zt.manager.ready.wait(), 2)
        assert zt.snapshots == [frozenset({"uid-a"})]
        n_failures = len(zt.manager.retry_delays)
        await server.close()  # the node agent restarts
        await asyncio.wait_for(_until(lambda: not zt.manager.ready.is_set()), 1)
        await asyncio.sleep(0.1)
        new_delays = zt.manager.retry_delays[n_failures:]
        assert new_delays[:2] == [0.02, 0.04]  # the backoff starts over after a good connection

        server = ZtunnelServer(sock_path)
        await server.start()
        server.upsert_pod("uid-b", INFO, netns_fd)
        await asyncio.wait_for(zt.manager.ready.wait(), 2)
        assert zt.snapshots[-1] == frozenset({"uid-b"})
        assert "uid-a" not in zt.fds and "uid-b" in zt.fds  # drained: not in the new snapshot
        assert zt.manager.connections == 2
        await server.close()
    finally:
        await zt.stop()
    assert open_fds() == before


async def _until(pred, step: float = 0.005) -> None:
    while not pred():
        await asyncio.sleep(step)
