"""HBONE: CONNECT request headers, HTTP/2 framing on socketpairs, then real TLS 1.3 on loopback.

No root needed: everything runs on socketpairs or 127.0.0.1 inside the test process.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from h2.errors import ErrorCodes

from lab.hbone import (
    ConnectRequest,
    HboneConnection,
    HboneConnectionLost,
    HboneConnectionPool,
    HboneHttpError,
    HboneStream,
    HboneStreamReset,
    copy_bidirectional,
    create_hbone_request,
    open_hbone_connection,
    serve_hbone,
)
from lab.hbone import headers as H
from lab.hbone.server import Handler, Respond, validate_connect_request
from lab.hbone.stream import STREAM_WINDOW, WRITE_HIGH_WATER

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


# ============================================================================ headers (pure)

@pytest.mark.parametrize("text,expected", [
    ("10.244.1.10:9080", ("10.244.1.10", 9080)),
    ("[fd00::a]:15008", ("fd00::a", 15008)),
    ("[FD00:0::A]:1", ("fd00::a", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_authority_accepts_socket_addresses(text: str, expected: tuple[str, int]) -> None:
    assert H.parse_authority(text) == expected


@pytest.mark.parametrize("text", [
    "", "10.0.0.1", "10.0.0.1:", ":80", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:-1", "10.0.0.1:+80",
    "10.0.0.1:80x", "reviews:9080", "fd00::a:80", "[fd00::a]", "[fd00::a]80", "[10.0.0.1]:80",
    "[fe80::1%eth0]:80", "010.0.0.1:80", "10.0.0.1:80 ", "10.0.0.1:123456",
])
def test_parse_authority_rejects_malformed(text: str) -> None:
    with pytest.raises(H.AuthorityError):
        H.parse_authority(text)


def test_format_authority_round_trips() -> None:
    assert H.format_authority("10.96.0.20", 9080) == "10.96.0.20:9080"
    assert H.format_authority("fd00:0:0::20", 80) == "[fd00::20]:80"
    for ip, port in [("10.96.0.20", 9080), ("fd00::20", 80)]:
        assert H.parse_authority(H.format_authority(ip, port)) == (ip, port)
    with pytest.raises(ValueError):
        H.format_authority("10.0.0.1", 0)


def test_hbone_address_allows_service_hostnames_for_double_hbone() -> None:
    assert H.parse_hbone_address("10.0.0.1:80") == H.HboneAddress("10.0.0.1", 80, True)
    addr = H.parse_hbone_address("Reviews.default.svc.cluster.local:9080")
    assert (addr.host, addr.port, addr.is_ip) == ("reviews.default.svc.cluster.local", 9080, False)
    for bad in ("under_score:80", "-x:80", "x:0", "1.2.3.999:80"):
        with pytest.raises(H.AuthorityError):
            H.parse_hbone_address(bad)


def test_baggage_format_and_parse() -> None:
    b = H.Baggage(cluster_name="Kubernetes", namespace="default", workload_kind="deployment",
                  workload_name="productpage-v1", service_name="productpage", service_version="v1")
    text = H.format_baggage(b)
    assert text == ("k8s.cluster.name=Kubernetes,k8s.namespace.name=default,"
                    "k8s.deployment.name=productpage-v1,service.name=productpage,service.version=v1")
    assert H.parse_baggage(text) == b
    assert H.parse_baggage("k8s.job.name=j, other=1,cloud.region=r1") == H.Baggage(
        workload_kind="job", workload_name="j", region="r1")
    with pytest.raises(ValueError):
        H.format_baggage(H.Baggage(workload_kind="lambda", workload_name="x"))
    with pytest.raises(ValueError):
        H.format_baggage(H.Baggage(namespace="a,b"))


def test_forwarded_header() -> None:
    assert H.format_forwarded("10.244.1.5", 43210) == 'for="10.244.1.5:43210"'
    value = H.format_forwarded("10.244.1.5", 43210, "reviews.default.svc.cluster.local")
    assert value == 'for="10.244.1.5:43210";host=reviews.default.svc.cluster.local'
    parsed = H.parse_forwarded(value)
    assert parsed.host == "reviews.default.svc.cluster.local"
    assert parsed.for_ip_port() == ("10.244.1.5", 43210)
    assert H.parse_forwarded('for="[fd00::5]:1"').for_ip_port() == ("fd00::5", 1)


def test_traceparent_carries_the_flow_id() -> None:
    flow = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
    value = H.format_traceparent(flow, span_id="00f067aa0ba902b7")
    assert value == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    tp = H.parse_traceparent(value)
    assert (tp.trace_id, tp.parent_id, tp.flags, tp.version) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 0, 0)
    assert H.parse_traceparent(H.format_traceparent(7)).trace_id == "0" * 31 + "7"
    random1, random2 = H.format_traceparent(), H.format_traceparent()
    assert random1 != random2 and len(random1) == 55
    H.parse_traceparent(random1)


@pytest.mark.parametrize("bad", [
    "", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-00", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-00",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-00", "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-00",
])
def test_parse_traceparent_rejects(bad: str) -> None:
    with pytest.raises(H.TraceparentError):
        H.parse_traceparent(bad)


def test_create_hbone_request_like_ztunnel() -> None:
    req = create_hbone_request("10.96.0.20", 9080, src_ip="10.244.1.5", src_port=40000,
                               service_host="reviews.default.svc.cluster.local",
                               baggage=H.Baggage(namespace="default", workload_kind="pod", workload_name="curl"),
                               trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    assert req.authority == "10.96.0.20:9080"
    full = req.header_list()
    assert full[:2] == [(":method", "CONNECT"), (":authority", "10.96.0.20:9080")]
    names = [k for k, _ in full]
    assert ":scheme" not in names and ":path" not in names  # RFC 9113 8.5
    assert req.get("forwarded") == 'for="10.244.1.5:40000";host=reviews.default.svc.cluster.local'
    assert req.get("baggage") == "k8s.namespace.name=default,k8s.pod.name=curl"
    assert H.parse_traceparent(req.get("traceparent") or "").trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert req.get(H.X_FORWARDED_NETWORK) is None
    inner = create_hbone_request("10.244.2.9", 9080, src_ip="10.244.1.5", src_port=1, forwarded_network="net1")
    assert inner.get("x-forwarded-network") == "net1"
    assert inner.get("forwarded") == 'for="10.244.1.5:1"'


@pytest.mark.parametrize("headers,status", [
    ([(":method", "CONNECT"), (":authority", "10.0.0.1:80")], 200),
    ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.1:80")], 400),
    ([(":method", "CONNECT"), (":authority", "productpage:9080")], 400),
    ([(":method", "CONNECT"), (":authority", "10.0.0.1")], 400),
    ([(":method", "CONNECT")], 400),
    ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-big", "a" * 17000)], 431),
])
def test_validate_connect_request(headers: list[tuple[str, str]], status: int) -> None:
    assert validate_connect_request(headers)[0] == status


# ============================================================================ helpers

async def echo_handler(request: ConnectRequest, respond: Respond) -> None:
    """Answer 200 and send every byte back; half-close when the client did."""
    stream = await respond(200, [("baggage", "k8s.namespace.name=dst")])
    while data := await stream.read(256 * 1024):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


async def socketpair_session(handler: Handler, **server_kw: int) -> tuple[HboneConnection, asyncio.Task[str]]:
    """A client HboneConnection and a serve_hbone task joined by a socketpair: no TLS."""
    a, b = socket.socketpair()
    cr, cw = await asyncio.open_connection(sock=a)
    sr, sw = await asyncio.open_connection(sock=b)
    server = asyncio.create_task(serve_hbone(sr, sw, handler, **server_kw))
    return HboneConnection(cr, cw), server


async def read_all(stream: HboneStream) -> bytes:
    return await stream.read()


def frame_types(data: bytes) -> list[int]:
    """The HTTP/2 frame types in a byte string (9-byte frame headers, RFC 9113 4.1)."""
    types, off = [], 0
    while off + 9 <= len(data):
        types.append(data[off + 3])
        off += 9 + int.from_bytes(data[off:off + 3], "big")
    return types


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 7 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


# ============================================================================ HTTP/2 on a socketpair

async def test_connect_over_socketpair_without_tls() -> None:
    seen: list[ConnectRequest] = []

    async def handler(request: ConnectRequest, respond: Respond) -> None:
        seen.append(request)
        await echo_handler(request, respond)

    conn, server = await socketpair_session(handler)
    req = create_hbone_request("10.244.1.10", 9080, src_ip="10.244.0.5", src_port=5555,
                               trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    status, resp_headers, stream = await conn.connect_stream(req.authority, req.headers)
    assert status == 200
    assert ("baggage", "k8s.namespace.name=dst") in resp_headers
    stream.write(b"hello HBONE")
    stream.write_eof()
    assert await read_all(stream) == b"hello HBONE"
    await stream.wait_closed()
    assert (stream.bytes_sent, stream.bytes_received) == (11, 11)

    assert len(seen) == 1
    got = seen[0]
    assert got.authority == "10.244.1.10:9080" and got.destination == ("10.244.1.10", 9080)
    assert got.get(":method") == "CONNECT" and got.get(":scheme") is None and got.get(":path") is None
    assert H.parse_traceparent(got.get("traceparent") or "").trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert H.parse_forwarded(got.get("forwarded") or "").for_ip_port() == ("10.244.0.5", 5555)
    assert conn.active_streams == 0
    await conn.aclose()
    assert "GOAWAY" in await server


async def test_non_connect_and_bad_authority_get_400() -> None:
    called = []

    async def handler(request: ConnectRequest, respond: Respond) -> None:
        called.append(request)
        await respond(200)

    conn, server = await socketpair_session(handler)
    with pytest.raises(HboneHttpError) as err:
        await conn.request([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.1:80")])
    assert err.value.status == 400
    for bad in ("productpage:9080", "10.0.0.1", "10.0.0.1:99999", "[fd00::1"):
        with pytest.raises(HboneHttpError) as err:
            await conn.connect_stream(bad)
        assert err.value.status == 400, bad
    assert called == []
    # the connection is still fine
    status, _, stream = await conn.connect_stream("10.0.0.1:80")
    assert status == 200 and len(called) == 1
    await conn.aclose()
    await server


@pytest.mark.parametrize("status", [401, 503])
async def test_handler_status_reaches_the_client(status: int) -> None:
    async def deny(request: ConnectRequest, respond: Respond) -> None:
        assert await respond(status) is None

    conn, server = await socketpair_session(deny)
    with pytest.raises(HboneHttpError) as err:
        await conn.connect_stream("10.0.0.1:80")
    assert err.value.status == status
    await asyncio.sleep(0.05)
    assert conn.active_streams == 0  # the stream slot is free again
    await conn.aclose()
    await server


async def test_handler_without_answer_or_failing_gives_503() -> None:
    async def silent(request: ConnectRequest, respond: Respond) -> None:
        if request.destination[1] == 1:
            raise RuntimeError("upstream connect failed")

    conn, server = await socketpair_session(silent)
    for port in (1, 2):
        with pytest.raises(HboneHttpError) as err:
            await conn.connect_stream(f"10.0.0.1:{port}")
        assert err.value.status == 503
    await conn.aclose()
    await server


async def test_header_list_over_16k_gets_431_and_connection_survives() -> None:
    conn, server = await socketpair_session(echo_handler)
    with pytest.raises(HboneHttpError) as err:
        await conn.connect_stream("10.0.0.1:80", [("x-padding", "p" * 20000)])
    assert err.value.status == 431
    status, _, stream = await conn.connect_stream("10.0.0.1:80", [("x-padding", "p" * 1000)])
    stream.write(b"ok")
    stream.write_eof()
    assert await read_all(stream) == b"ok"
    await conn.aclose()
    await server


async def test_half_close_both_directions() -> None:
    """END_STREAM is a TCP half-close: the other direction keeps flowing."""
    log: list[str] = []

    async def handler(request: ConnectRequest, respond: Respond) -> None:
        stream = await respond(200)
        if request.destination[1] == 1:
            # reply only after the client finished sending (like an HTTP/1.0 server)
            data = await stream.read()
            log.append("server saw EOF")
            stream.write(b"reply to " + data)
            stream.write_eof()
        else:
            # half-close first, then keep reading what the client sends
            stream.write(b"banner")
            stream.write_eof()
            await stream.wait_sent()
            data = await stream.read()
            log.append(f"server read {len(data)} after its own EOF")

    conn, server = await socketpair_session(handler)
    _, _, s1 = await conn.connect_stream("10.0.0.1:1")
    s1.write(b"request")
    s1.write_eof()
    assert await read_all(s1) == b"reply to request"
    await s1.wait_closed()
    assert s1.error is None

    _, _, s2 = await conn.connect_stream("10.0.0.1:2")
    assert await s2.read() == b"banner"  # server's EOF seen ...
    s2.write(b"x" * 100_000)  # ... and we can still send
    await s2.drain()
    s2.write_eof()
    await s2.wait_closed()
    await asyncio.sleep(0.05)
    assert s2.error is None
    assert log == ["server saw EOF", "server read 100000 after its own EOF"]
    await conn.aclose()
    await server


async def test_close_resets_the_stream_for_the_peer() -> None:
    errors: list[HboneStreamReset] = []

    async def handler(request: ConnectRequest, respond: Respond) -> None:
        stream = await respond(200)
        try:
            await stream.read()
        except HboneStreamReset as e:
            errors.append(e)

    conn, server = await socketpair_session(handler)
    _, _, stream = await conn.connect_stream("10.0.0.1:80")
    stream.write(b"partial")
    await stream.drain()
    await asyncio.sleep(0.05)
    stream.close()
    await asyncio.sleep(0.1)
    assert len(errors) == 1 and errors[0].error_code == ErrorCodes.CANCEL
    with pytest.raises(HboneStreamReset):
        stream.write(b"more")
    await conn.aclose()
    await server


async def test_flow_control_credit_only_when_consumer_reads() -> None:
    """A stalled reader stops the sender after one stream window (backpressure)."""
    release = asyncio.Event()
    received = []

    async def slow_reader(request: ConnectRequest, respond: Respond) -> None:
        stream = await respond(200)
        await release.wait()
        received.append(len(await stream.read()))
        stream.write_eof()

    conn, server = await socketpair_session(slow_reader)
    _, _, stream = await conn.connect_stream("10.0.0.1:80")
    total = 3 * STREAM_WINDOW
    stream.write(pattern(total))
    for _ in range(100):
        if stream.bytes_sent >= STREAM_WINDOW:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(stream.drain(), 0.3)
    assert stream.bytes_sent == STREAM_WINDOW  # nothing beyond the window left the sender
    assert stream.pending_write == total - STREAM_WINDOW > WRITE_HIGH_WATER
    release.set()
    stream.write_eof()
    await stream.drain()
    assert await read_all(stream) == b""
    assert received == [total]
    await conn.aclose()
    await server


async def test_101st_stream_is_refused_by_the_server() -> None:
    """A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS gets RST_STREAM(REFUSED_STREAM)
    for the extra stream only; the other 100 and the connection carry on."""
    conn, server = await socketpair_session(echo_handler)
    conn.max_streams = 200  # misbehave: the server's SETTINGS have not arrived yet
    streams = [conn.open_stream(H.connect_header_list(f"10.0.0.1:{1000 + i}")) for i in range(101)]
    results = await asyncio.gather(*(conn.await_response(s) for s in streams), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1
    assert isinstance(refused[0], HboneStreamReset) and refused[0].error_code == ErrorCodes.REFUSED_STREAM
    assert isinstance(results[100], HboneStreamReset)
    assert conn.stream_limit() == 100  # the server's SETTINGS now apply
    for status, _, stream in results[:100]:  # type: ignore[misc]
        assert status == 200
        stream.write(b"still alive")
        stream.write_eof()
    for _, _, stream in results[:100]:  # type: ignore[misc]
        assert await read_all(stream) == b"still alive"
    await asyncio.sleep(0.05)
    _, _, again = await conn.connect_stream("10.0.0.1:80")
    again.write_eof()
    assert await read_all(again) == b""
    await conn.aclose()
    await server


async def test_garbage_closes_only_that_connection() -> None:
    """Not an HTTP/2 preface: GOAWAY and close; the server keeps serving others."""
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=b)
    server = asyncio.create_task(serve_hbone(sr, sw, echo_handler))
    cr, cw = await asyncio.open_connection(sock=a)
    cw.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
    reason = await asyncio.wait_for(server, 5)
    assert "protocol error" in reason.lower()
    rest = await asyncio.wait_for(cr.read(), 5)  # server SETTINGS + GOAWAY, then EOF
    assert frame_types(rest)[0] == 0x4 and frame_types(rest)[-1] == 0x7  # SETTINGS ... GOAWAY
    cw.close()

    conn, server2 = await socketpair_session(echo_handler)
    _, _, stream = await conn.connect_stream("10.0.0.1:80")
    stream.write(b"fine")
    stream.write_eof()
    assert await read_all(stream) == b"fine"
    await conn.aclose()
    await server2


async def test_connection_loss_fails_streams() -> None:
    conn, server = await socketpair_session(echo_handler)
    _, _, stream = await conn.connect_stream("10.0.0.1:80")
    server.cancel()
    with pytest.raises(HboneConnectionLost):
        while True:
            await stream.read()
    with pytest.raises(HboneConnectionLost):
        await conn.connect_stream("10.0.0.1:80")
    await conn.aclose()


async def test_copy_bidirectional_to_a_tcp_upstream_keeps_replies_after_half_close() -> None:
    """The destination-ztunnel shape: stream <-> TCP to the app. The app answers only after
    EOF; closing instead of half-closing would lose that answer."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(b"app got %d bytes" % len(data))
        await writer.drain()
        writer.close()

    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    counts: list[tuple[int, int]] = []

    async def inbound(request: ConnectRequest, respond: Respond) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*request.destination)
        except OSError:
            await respond(503)
            return
        stream = await respond(200)
        try:
            counts.append(await copy_bidirectional(stream, up_r, up_w))
        finally:
            up_w.close()

    conn, server = await socketpair_session(inbound)
    _, _, stream = await conn.connect_stream(f"127.0.0.1:{app_port}")
    payload = pattern(3 * MiB)
    stream.write(payload)
    stream.write_eof()
    reply = await read_all(stream)
    assert reply == b"app got %d bytes" % len(payload)
    await asyncio.sleep(0.05)
    # (bytes_sent into the stream = from the app, bytes_recv from the stream = to the app)
    assert counts == [(len(reply), len(payload))]
    app_server.close()
    with pytest.raises(HboneHttpError) as err:  # port 1 on loopback: refused -> 503
        await conn.connect_stream("127.0.0.1:1")
    assert err.value.status == 503
    await conn.aclose()
    await server
    await app_server.wait_closed()


async def test_stream_readuntil_and_readexactly() -> None:
    async def handler(request: ConnectRequest, respond: Respond) -> None:
        stream = await respond(200)
        line = await stream.readline()
        body = await stream.readexactly(5)
        stream.write(line.upper() + body[::-1])
        stream.write_eof()

    conn, server = await socketpair_session(handler)
    _, _, stream = await conn.connect_stream("10.0.0.1:80")
    stream.write(b"get / http/1.1\r\nhel")
    await asyncio.sleep(0.02)
    stream.write(b"lo and more")
    stream.write_eof()
    assert await read_all(stream) == b"GET / HTTP/1.1\r\nolleh"
    await conn.aclose()
    await server


# ============================================================================ TLS 1.3 loopback

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, cn)])


def make_pki(tmp: Path) -> dict[str, tuple[str, str]]:
    """A throwaway CA and two workload certs with SPIFFE URI SANs, written as files
    (ssl.load_cert_chain only reads files). Returns name -> (cert chain file, key file)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("cluster.local")).issuer_name(_name("cluster.local"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    (tmp / "root.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out = {"root": (str(tmp / "root.pem"), "")}
    for sa in ("client", "server"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/default/sa/{sa}")]), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_file, key_file = tmp / f"{sa}.pem", tmp / f"{sa}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
        out[sa] = (str(cert_file), str(key_file))
    return out


def tls_context(server_side: bool, pki: dict[str, tuple[str, str]], with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki["root"][0])
    if with_cert:
        ctx.load_cert_chain(*pki["server" if server_side else "client"])
    return ctx


TlsServer = tuple[int, dict[str, tuple[str, str]], list[str]]


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[TlsServer]:
    """An HBONE listener on 127.0.0.1 with mutual TLS 1.3; yields (port, pki, peer identities seen)."""
    pki = make_pki(tmp_path)
    peers: list[str] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        cert = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        peers.append(san.get_values_for_type(x509.UniformResourceIdentifier)[0])
        await serve_hbone(reader, writer, echo_handler)

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=tls_context(True, pki))
    yield server.sockets[0].getsockname()[1], pki, peers
    server.close()
    await server.wait_closed()


async def test_tls13_mutual_alpn_h2_ten_concurrent_streams_echo_1mib(tls_server: TlsServer) -> None:
    port, pki, peers = tls_server
    conn = await open_hbone_connection("127.0.0.1", port, tls_context(False, pki))
    ssl_object = conn.writer.get_extra_info("ssl_object")
    assert ssl_object.version() == "TLSv1.3" and ssl_object.selected_alpn_protocol() == "h2"

    async def one(i: int) -> bytes:
        _, _, stream = await conn.connect_stream(f"10.244.1.{i}:9080")
        payload = pattern(MiB, seed=i)

        async def send() -> None:
            for off in range(0, len(payload), 100_000):
                stream.write(payload[off:off + 100_000])
                await stream.drain()
            stream.write_eof()

        sender = asyncio.create_task(send())
        echoed = await read_all(stream)
        await sender
        return echoed

    results = await asyncio.gather(*(one(i) for i in range(10)))
    assert [r == pattern(MiB, seed=i) for i, r in enumerate(results)] == [True] * 10
    assert conn.streams_opened == 10 and conn.active_streams == 0
    assert peers == ["spiffe://cluster.local/ns/default/sa/client"]  # one TLS connection, the client identity
    await conn.aclose()


async def test_tls_client_without_certificate_is_rejected(tls_server: TlsServer) -> None:
    """TLS 1.3: the client's handshake 'succeeds'; the rejection shows as a dead connection."""
    port, pki, peers = tls_server
    try:
        conn = await open_hbone_connection("127.0.0.1", port, tls_context(False, pki, with_cert=False))
    except (ssl.SSLError, ConnectionError):
        return  # rejected during the handshake: also fine
    with pytest.raises((HboneConnectionLost, HboneStreamReset)):
        await asyncio.wait_for(conn.connect_stream("10.0.0.1:80"), 5)
    assert peers == []
    await conn.aclose()


async def test_tls_garbage_then_good_connection(tls_server: TlsServer) -> None:
    port, pki, peers = tls_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_context(False, pki), server_hostname="")
    writer.write(b"\x00" * 64 + b"this is not HTTP/2")
    types = frame_types(await asyncio.wait_for(reader.read(), 5))
    assert types[0] == 0x4 and types[-1] == 0x7  # SETTINGS ... GOAWAY, then EOF
    writer.close()
    conn = await open_hbone_connection("127.0.0.1", port, tls_context(False, pki))
    _, _, stream = await conn.connect_stream("10.0.0.1:80")
    stream.write(b"after garbage")
    stream.write_eof()
    assert await read_all(stream) == b"after garbage"
    assert len(peers) == 2
    await conn.aclose()


# ============================================================================ pool

async def test_pool_reuse_separation_and_a_second_connection_at_101(tls_server: TlsServer) -> None:
    port, pki, _ = tls_server
    ctx = tls_context(False, pki)
    made: list[tuple[str, ...]] = []

    async def factory(key: tuple[str, ...]) -> HboneConnection:
        made.append(key)
        return await open_hbone_connection("127.0.0.1", port, ctx)

    pool: HboneConnectionPool[tuple[str, ...]] = HboneConnectionPool(factory)
    key_a = ("spiffe://cluster.local/ns/default/sa/client", "spiffe://cluster.local/ns/default/sa/server",
             "10.244.0.5", "10.244.1.10:15008")
    key_b = key_a[:3] + ("10.244.2.10:15008",)

    _, _, s1 = await pool.connect_stream(key_a, "10.244.1.10:9080")
    _, _, s2 = await pool.connect_stream(key_a, "10.244.1.10:9080")
    _, _, s3 = await pool.connect_stream(key_b, "10.244.2.10:9080")
    assert made == [key_a, key_b]
    assert len(pool.connections(key_a)) == 1 and pool.connections(key_a)[0].active_streams == 2
    assert pool.connections(key_b)[0] is not pool.connections(key_a)[0]
    for s in (s1, s2, s3):
        s.write_eof()
        assert await read_all(s) == b""

    # 101 concurrent streams for one key: the pool opens a second connection (ztunnel's way);
    # it neither queues the 101st nor lets the server refuse it.
    first = pool.connections(key_a)[0]
    opened = await asyncio.gather(*(pool.connect_stream(key_a, "10.244.1.10:9080") for _ in range(101)))
    # the full connection left the pool for good (ztunnel's maybe_checkin_conn); it still serves its 100
    conns = pool.connections(key_a)
    assert first.retired and [c.active_streams for c in conns] == [100, 1]
    assert made == [key_a, key_b, key_a]
    for _, _, s in opened:
        s.write_eof()
    for _, _, s in opened:
        assert await read_all(s) == b""
    for _ in range(100):  # its streams done, the retired connection closes
        if first.closed.is_set():
            break
        await asyncio.sleep(0.01)
    assert first.closed.is_set() and pool.connections(key_a) == conns[1:]
    _, _, later = await pool.connect_stream(key_a, "10.244.1.10:9080")  # the pool's other connection serves it
    assert made == [key_a, key_b, key_a] and pool.connections(key_a) == conns[1:]
    later.write_eof()
    assert await read_all(later) == b""
    await pool.close()
    assert pool.keys() == []


async def test_pool_releases_idle_connections() -> None:
    servers: list[asyncio.Task[str]] = []

    async def factory(key: str) -> HboneConnection:
        conn, server = await socketpair_session(echo_handler)
        servers.append(server)
        return conn

    pool: HboneConnectionPool[str] = HboneConnectionPool(factory, idle_timeout=0.5)
    _, _, stream = await pool.connect_stream("k", "10.0.0.1:80")
    conn = pool.connections("k")[0]
    await asyncio.sleep(0.7)
    assert not conn.closed.is_set()  # busy connections stay
    stream.write_eof()
    assert await read_all(stream) == b""
    await asyncio.sleep(0.05)
    assert pool.connections("k") == [conn]  # idle, but not for long enough
    for _ in range(100):
        if conn.closed.is_set():
            break
        await asyncio.sleep(0.05)
    assert conn.closed.is_set() and pool.connections("k") == []
    _, _, again = await pool.connect_stream("k", "10.0.0.1:80")  # a fresh connection
    assert pool.connections("k")[0] is not conn and len(servers) == 2
    again.close()
    await pool.close()
    await asyncio.gather(*servers)
