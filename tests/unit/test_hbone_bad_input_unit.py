"""Unit tests (no root) of the fixes the lab's bad-input test (tests/lab/test_hbone_bad_input.py)
called for, each on the real code over loopback sockets:

- the HBONE server reports the streams it answers by itself (`on_reject`: 400, REFUSED_STREAM),
  and ztunnel's inbound logs them, and refuses (with a log line) a client without ALPN h2;
- the source side checks the server's identity BEFORE sending any HTTP/2 byte
  (`open_hbone_connection(verify=)`, ztunnel's WorkloadConnector);
- `io_error` never prints an empty "io error: " for asyncio's errno-less ConnectionResetError.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from datetime import timedelta

import h2.config
import h2.connection
import h2.events
import pytest

from lab.hbone import (
    ConnectRequest,
    HboneConnection,
    HboneHttpError,
    RejectedStream,
    serve_hbone,
)
from lab.hbone.headers import connect_header_list
from lab.istiod.ca import CertificateAuthority
from lab.proto.xds import ADDRESS_TYPE
from lab.proto.zds import WorkloadInfo
from lab.tls.contexts import (
    IdentityMismatch,
    client_context,
    server_context,
    verify_server_identity,
)
from lab.tls.identity import Identity
from lab.ztunnel.config import Config
from lab.ztunnel.identity_manager import IdentityManager
from lab.ztunnel.inpod.netns import InpodNetns
from lab.ztunnel.proxy import InpodWorkload, MeshInputs, ProxyInputs, io_error
from lab.ztunnel.proxy.connection_manager import ConnectionManager
from lab.ztunnel.proxy.inbound import serve_tunnel
from lab.ztunnel.proxy.pool import (
    HboneConnectFailed,
    WorkloadConnector,
    WorkloadHbonePool,
    WorkloadKey,
)
from lab.ztunnel.state import ProxyState, StateChanges
from lab.ztunnel.tls_workload import WorkloadTls
from tests.unit.test_ztunnel_dataplane import HereNetns, InProcessCa

pytestmark = pytest.mark.timeout(30)

SLEEP = Identity.of("default", "sleep")
HTTPBIN = Identity.of("default", "httpbin")


async def _echo(request: ConnectRequest, respond) -> None:  # type: ignore[no-untyped-def]
    stream = await respond(200)
    if stream is not None:
        stream.write(await stream.read())
        stream.write_eof()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


# ------------------------------------------------------------------ lab.hbone: on_reject
async def test_serve_hbone_reports_the_streams_it_answers_itself():
    """400s for a non-CONNECT and a bad authority, REFUSED_STREAM beyond the stream limit: each
    reaches `on_reject`, none reaches the handler, and the connection keeps serving."""
    seen: list[RejectedStream] = []
    handled: list[str] = []

    async def handler(request: ConnectRequest, respond) -> None:  # type: ignore[no-untyped-def]
        handled.append(request.authority)
        await _echo(request, respond)

    s_sock, c_sock = _pair()
    sr, sw = await asyncio.open_connection(sock=s_sock)
    server = asyncio.create_task(serve_hbone(sr, sw, handler, max_streams=2, on_reject=seen.append))
    cr, cw = await asyncio.open_connection(sock=c_sock)
    client = HboneConnection(cr, cw)
    try:
        with pytest.raises(HboneHttpError) as e:
            await client.request([(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                  (":authority", "10.0.0.1:80")])
        assert e.value.status == 400
        with pytest.raises(HboneHttpError):
            await client.connect_stream("productpage:9080")
        assert [(r.status, r.reason) for r in seen] == [
            (400, "method 'GET' is not CONNECT"), (400, "not an IP address in authority 'productpage:9080'")]
        assert ("productpage:9080" not in handled) and dict(seen[0].headers)[":method"] == "GET"
        status, _, stream = await client.connect_stream("10.0.0.1:80")
        stream.write(b"ping")
        stream.write_eof()
        assert status == 200 and await stream.read() == b"ping"
    finally:
        await client.aclose()
        await server

    # A raw client that ignores the limit of 2: the third and fourth streams are refused.
    seen.clear()
    s_sock, c_sock = _pair()
    sr, sw = await asyncio.open_connection(sock=s_sock)
    server = asyncio.create_task(serve_hbone(sr, sw, lambda req, respond: asyncio.sleep(3600), max_streams=2,
                                             on_reject=seen.append))
    cr, cw = await asyncio.open_connection(sock=c_sock)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    for _ in range(4):
        conn.send_headers(conn.get_next_available_stream_id(), connect_header_list("10.0.0.1:80"))
    cw.write(conn.data_to_send())
    resets: list[int] = []
    while len(resets) < 2:
        for ev in conn.receive_data(await asyncio.wait_for(cr.read(65536), 5)):
            if isinstance(ev, h2.events.StreamReset):
                resets.append(ev.stream_id)
    assert resets == [5, 7]
    assert [(r.stream_id, r.status) for r in seen] == [(5, 0), (7, 0)]
    assert "more than 2 concurrent streams" in seen[0].reason and "REFUSED_STREAM" in seen[0].reason
    cw.close()
    await asyncio.wait_for(server, 5)


async def test_a_failing_on_reject_does_not_take_the_connection_down():
    def broken(_: RejectedStream) -> None:
        raise RuntimeError("boom")

    s_sock, c_sock = _pair()
    sr, sw = await asyncio.open_connection(sock=s_sock)
    server = asyncio.create_task(serve_hbone(sr, sw, _echo, on_reject=broken))
    cr, cw = await asyncio.open_connection(sock=c_sock)
    client = HboneConnection(cr, cw)
    try:
        with pytest.raises(HboneHttpError):
            await client.connect_stream("not-an-ip:80")
        status, _, stream = await client.connect_stream("10.0.0.1:80")
        stream.write_eof()
        assert status == 200 and await stream.read() == b""
    finally:
        await client.aclose()
        await server


async def test_a_client_closing_right_after_a_finished_stream_does_not_cut_its_handler():
    """The stream ended cleanly both ways, then the client closed the connection at once (as a
    client does with a one-shot tunnel): the handler is finishing up (ztunnel writes the access
    log line) and must not be cancelled, or a clean connection is logged as cut."""
    finished: list[str] = []

    async def handler(request: ConnectRequest, respond) -> None:  # type: ignore[no-untyped-def]
        await _echo(request, respond)
        await asyncio.sleep(0.05)  # the tail of a handler after its stream ended
        finished.append(request.authority)

    s_sock, c_sock = _pair()
    sr, sw = await asyncio.open_connection(sock=s_sock)
    server = asyncio.create_task(serve_hbone(sr, sw, handler))
    cr, cw = await asyncio.open_connection(sock=c_sock)
    client = HboneConnection(cr, cw)
    status, _, stream = await client.connect_stream("10.0.0.1:80")
    stream.write(b"once")
    stream.write_eof()
    assert status == 200 and await stream.read() == b"once"
    await client.aclose()
    await asyncio.wait_for(server, 5)
    assert finished == ["10.0.0.1:80"]


# ------------------------------------------------------------------ ztunnel inbound: ALPN and rejected streams
@pytest.fixture
async def inbound(tmp_path):
    """serve_tunnel of pod httpbin (10.0.0.9 in xDS) on a loopback listener; the access log in a list."""
    ca = CertificateAuthority.create(clock_skew_grace=timedelta(0))
    manager = IdentityManager(lambda: InProcessCa(ca, {("default", "httpbin"), ("default", "sleep")}), ttl=3600)
    tls = WorkloadTls(ca.root_pem)
    state, changes = ProxyState(), StateChanges()
    state.apply(ADDRESS_TYPE, [("uid-httpbin", {"workload": {
        "uid": "uid-httpbin", "name": "httpbin", "namespace": "default", "addresses": ["127.0.0.1"],
        "node": "worker", "service_account": "httpbin", "tunnel_protocol": "HBONE"}})])
    lines: list[str] = []
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    pi = ProxyInputs(cfg=Config("lab", "worker", "/z"), workload=InpodWorkload("uid-httpbin", WorkloadInfo(
        "httpbin", "default", "httpbin")), netns=InpodNetns(-1, fd), connections=ConnectionManager(),
        emit=lambda *a, **k: None, write_access_log=lines.append,
        mesh=MeshInputs(state, changes, manager, tls, WorkloadHbonePool(lambda key: None)))  # type: ignore
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    tunnels: list[asyncio.Task] = []

    async def accept() -> None:
        while True:
            sock, _ = await asyncio.get_running_loop().sock_accept(listener)
            tunnels.append(asyncio.create_task(serve_tunnel(pi, sock)))

    acceptor = asyncio.create_task(accept())
    client_cert = await manager.get(SLEEP)
    yield listener.getsockname(), client_cert, ca, lines
    acceptor.cancel()
    for t in tunnels:
        t.cancel()
    await asyncio.gather(acceptor, *tunnels, return_exceptions=True)
    listener.close()
    await manager.close()
    tls.close()
    pi.netns.close()


def _ctx(cert, roots: bytes, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = client_context(cert, roots)
    ctx.set_alpn_protocols(alpn or [])
    return ctx


async def _wait_for_line(lines: list[str], fragment: str) -> str:
    for _ in range(100):
        found = [l for l in lines if fragment in l]
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no access log line with {fragment!r}: {lines}")


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]])
async def test_inbound_refuses_and_logs_a_client_without_alpn_h2(inbound, alpn):
    addr, cert, ca, lines = inbound
    reader, writer = await asyncio.open_connection(*addr, ssl=_ctx(cert, ca.root_pem, alpn), server_hostname="")
    local = writer.get_extra_info("sockname")
    try:
        assert await asyncio.wait_for(reader.read(100), 5) == b""
    except ConnectionResetError:
        pass
    finally:
        writer.transport.abort()
    line = await _wait_for_line(lines, f"src.addr=127.0.0.1:{local[1]} ")
    assert "connection failed" in line and "did not negotiate ALPN h2 (got None)" in line


async def test_inbound_logs_bad_requests_and_refused_streams(inbound):
    addr, cert, ca, lines = inbound
    reader, writer = await asyncio.open_connection(*addr, ssl=_ctx(cert, ca.root_pem, ["h2"]), server_hostname="")
    local = writer.get_extra_info("sockname")
    client = HboneConnection(reader, writer)
    try:
        with pytest.raises(HboneHttpError) as e:
            await client.request([(":method", "POST"), (":scheme", "https"), (":path", "/"),
                                  (":authority", "127.0.0.1:80")])
        assert e.value.status == 400
        line = await _wait_for_line(lines, "bad request (400)")
        assert f"src.addr=127.0.0.1:{local[1]} " in line and 'direction="inbound"' in line
        assert "method 'POST' is not CONNECT" in line and line.split("\t")[1] == "warn"
    finally:
        await client.aclose()


# ------------------------------------------------------------------ source side: identity before any byte
async def _impostor(ca: CertificateAuthority, identity: Identity, received: list[bytes]):
    """A TLS server with a valid mesh certificate of `identity`; records every byte it gets."""
    manager = IdentityManager(lambda: InProcessCa(ca, {(identity.namespace, identity.service_account)}), ttl=3600)
    ctx = server_context(await manager.get(identity), ca.root_pem)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.append(data)
        except (ConnectionError, ssl.SSLError):
            pass
        received.append(b"<eof>")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    return server, manager


async def test_connector_sends_nothing_to_a_server_with_the_wrong_identity():
    """ztunnel's WorkloadConnector expects httpbin; the server proves `other`: refused with
    "peer did not present the expected SAN", and not one HTTP/2 byte (preface) was sent."""
    ca = CertificateAuthority.create(clock_skew_grace=timedelta(0))
    other = Identity.of("default", "other")
    received: list[bytes] = []
    server, impostor_ids = await _impostor(ca, other, received)
    manager = IdentityManager(lambda: InProcessCa(ca, {("default", "sleep")}), ttl=3600)
    tls = WorkloadTls(ca.root_pem)
    try:
        connector = WorkloadConnector(manager, tls, mark=0)
        key = WorkloadKey(SLEEP, (HTTPBIN,), "127.0.0.1", server.sockets[0].getsockname()[:2],
                          netns=HereNetns())  # type: ignore[arg-type]
        with pytest.raises(HboneConnectFailed) as e:
            await connector(key)
        assert str(e.value) == (f"peer did not present the expected SAN: expected one of ['{HTTPBIN}'], "
                                f"got ['{other}']")
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.02)
        assert received == [b"<eof>"]
    finally:
        server.close()
        await manager.close()
        await impostor_ids.close()
        tls.close()


async def test_open_hbone_connection_verifies_before_the_preface():
    from lab.hbone import open_hbone_connection

    ca = CertificateAuthority.create(clock_skew_grace=timedelta(0))
    received: list[bytes] = []
    server, ids = await _impostor(ca, HTTPBIN, received)
    manager = IdentityManager(lambda: InProcessCa(ca, {("default", "sleep")}), ttl=3600)
    host, port = server.sockets[0].getsockname()[:2]
    ctx = client_context(await manager.get(SLEEP), ca.root_pem)
    try:
        with pytest.raises(IdentityMismatch):
            await open_hbone_connection(host, port, ctx, verify=lambda so: verify_server_identity(so, [SLEEP]))
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.02)
        assert received == [b"<eof>"]
        received.clear()
        proved: list[Identity] = []
        conn = await open_hbone_connection(host, port, ctx,
                                           verify=lambda so: proved.append(verify_server_identity(so, [HTTPBIN])))
        assert proved == [HTTPBIN]
        await conn.aclose()
        assert received and received[0].startswith(b"PRI * HTTP/2.0")  # the right server gets the preface
    finally:
        server.close()
        await manager.close()
        await ids.close()


# ------------------------------------------------------------------ io_error
def test_io_error_never_prints_an_empty_reason():
    assert io_error(ConnectionResetError()) == "io error: Connection reset by peer (os error 104)"
    assert io_error(ConnectionAbortedError()) == "io error: ConnectionAbortedError"
    assert io_error(ConnectionAbortedError("SSL handshake is taking longer than 10.0 seconds: aborting the "
                                           "connection")).endswith("aborting the connection")
    assert io_error(ConnectionRefusedError(111, "x")) == "io error: Connection refused (os error 111)"
