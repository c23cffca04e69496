"""HBONE's data path without detours: the bytes on the wire and the streams are the same as
with plain h2 and asyncio streams, only with fewer copies (lab.hbone.wire, lab.hbone.stream).

No root needed: socketpairs and in-memory h2 connections.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import pytest
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, WindowUpdateFrame

from lab.hbone import ConnectRequest, HboneConnection, serve_hbone, wire
from lab.hbone.server import Respond
from lab.hbone.stream import (
    MAX_FRAME_SIZE,
    PASS_THROUGH_PAYLOAD,
    SMALL_PIECE,
    HboneFrameBuffer,
    HboneH2Connection,
    _take_frame_payload,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 13 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


# ============================================================================ sending: same bytes as h2

def _client_exchange(conn: h2.connection.H2Connection) -> bytes:
    """The same sequence of client actions; returns every byte the connection queued."""
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE})
    # the server's settings, so that frames up to 1 MiB may be sent
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 8 * MiB})
    server.initiate_connection()
    server.increment_flow_control_window(8 * MiB)
    conn.receive_data(server.data_to_send())
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.244.1.5:9080")])
    conn.send_data(1, b"first", end_stream=False)
    conn.ping(b"12345678")
    conn.send_data(1, pattern(300_000), end_stream=False)
    conn.send_data(1, memoryview(pattern(MAX_FRAME_SIZE, 3)), end_stream=False)
    conn.send_data(1, b"padded", pad_length=4)
    conn.send_headers(3, [(":method", "CONNECT"), (":authority", "10.244.1.6:9080")])
    conn.send_data(3, b"", end_stream=True)
    conn.send_data(1, b"last", end_stream=True)
    if isinstance(conn, HboneH2Connection):
        return b"".join(bytes(piece) for piece in conn.take_output())
    return conn.data_to_send()


def test_data_frames_leave_as_header_and_payload_with_the_bytes_h2_would_send() -> None:
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    ours = _client_exchange(HboneH2Connection(config))
    theirs = _client_exchange(h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                                    header_encoding=None)))
    assert ours == theirs


def test_a_large_payload_is_handed_on_without_a_copy() -> None:
    conn = HboneH2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.244.1.5:9080")])
    payload = pattern(PASS_THROUGH_PAYLOAD)  # within h2's default frame size and window
    conn.send_data(1, payload)
    conn.send_data(1, b"short")
    pieces = conn.take_output()
    assert pieces[1] is payload  # the very object the stream queued
    assert pieces[0].endswith(bytes([0x40, 0x00, 0, 0, 0, 0, 0, 1]))  # its DATA frame header, after HEADERS
    assert pieces[2] == DataFrame(1, b"short").serialize()  # a short payload is serialised as usual
    assert conn.take_output() == []


def test_data_to_send_still_returns_everything_in_order() -> None:
    conn = HboneH2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.244.1.5:9080")])
    conn.send_data(1, b"abc")
    conn.ping(b"87654321")
    everything = conn.data_to_send()
    assert everything.endswith(PingFrame(0, b"87654321").serialize())
    assert DataFrame(1, b"abc").serialize() in everything
    assert conn.take_output() == [] and conn.data_to_send() == b""


# ============================================================================ receiving: same frames as h2

def _frames() -> list[bytes]:
    frames = [
        HeadersFrame(1, b"\x82\x84", flags=["END_HEADERS"]).serialize(),
        DataFrame(1, pattern(70_000)).serialize(),
        DataFrame(1, b"").serialize(),
        WindowUpdateFrame(0, 65535).serialize(),
        DataFrame(3, pattern(1000, 5), flags=["END_STREAM"]).serialize(),
    ]
    padded = DataFrame(5, b"with padding", flags=["PADDED"])
    padded.pad_length = 7
    frames.append(padded.serialize())
    frames.append(PingFrame(0, b"pingpong").serialize())
    frames.append(DataFrame(7, pattern(MAX_FRAME_SIZE, 9)).serialize())
    return frames


def _parse(buffer: FrameBuffer, chunks: list[bytes]) -> list[tuple[str, int, bytes, set[str]]]:
    buffer.max_frame_size = MAX_FRAME_SIZE
    out = []
    for chunk in chunks:
        buffer.add_data(chunk)
        for frame in buffer:
            body = getattr(frame, "data", b"") or getattr(frame, "opaque_data", b"")
            out.append((type(frame).__name__, frame.stream_id, bytes(body), set(frame.flags)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_frames_parse_like_h2_whatever_the_chunking(seed: int) -> None:
    wire_bytes = b"".join(_frames())
    rnd = random.Random(seed)
    cuts = sorted(rnd.sample(range(1, len(wire_bytes)), 40))
    chunks = [wire_bytes[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire_bytes)])]
    ours = _parse(HboneFrameBuffer(), chunks)
    assert ours == _parse(FrameBuffer(), chunks)
    assert [name for name, *_ in ours].count("DataFrame") == 5


def test_data_frame_inside_a_header_block_is_a_protocol_error() -> None:
    buf = HboneFrameBuffer()
    buf.max_frame_size = MAX_FRAME_SIZE
    buf.add_data(HeadersFrame(1, b"\x82").serialize() + DataFrame(1, b"x").serialize())
    with pytest.raises(h2.exceptions.ProtocolError):
        list(buf)
    buf = HboneFrameBuffer()
    buf.max_frame_size = MAX_FRAME_SIZE
    buf.add_data(HeadersFrame(1, b"\x82").serialize() + ContinuationFrame(1, b"\x84", flags=["END_HEADERS"]).serialize()
                 + DataFrame(1, b"ok").serialize())
    assert [type(f) for f in buf] == [HeadersFrame, DataFrame]


def test_an_oversized_data_frame_is_refused() -> None:
    buf = HboneFrameBuffer()
    buf.max_frame_size = 16_384
    buf.add_data(DataFrame(1, b"x" * 16_385).serialize())
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        next(buf)


# ============================================================================ a stream's send queue

def test_take_frame_payload_joins_small_pieces_and_slices_large_ones_without_copying() -> None:
    big = pattern(3 * SMALL_PIECE)
    queue: collections.deque[bytes | memoryview] = collections.deque([big])
    first = _take_frame_payload(queue, SMALL_PIECE)
    assert isinstance(first, memoryview) and first.obj is big and bytes(first) == big[:SMALL_PIECE]
    assert _take_frame_payload(queue, 10 * SMALL_PIECE) == big[SMALL_PIECE:]
    assert not queue

    queue = collections.deque([b"a" * 10, b"b" * 20, b"c" * 30])
    assert _take_frame_payload(queue, 35) == b"a" * 10 + b"b" * 20 + b"c" * 5
    assert [bytes(p) for p in queue] == [b"c" * 25]


# ============================================================================ wire: pass-through streams

async def _wire_server(handler) -> tuple[socket.socket, asyncio.Server]:
    listener = socket.create_server(("127.0.0.1", 0))
    server = await wire.start_server(handler, sock=listener)
    return listener, server


async def test_chunk_reader_hands_out_what_the_socket_returned_then_eof() -> None:
    got: list[bytes] = []
    done = asyncio.Event()

    async def handler(reader: wire.ChunkReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(256 * 1024):
            got.append(chunk)
        assert reader.at_eof() and reader.exception() is None
        writer.write(b"%d" % sum(map(len, got)))
        writer.close()
        done.set()

    listener, server = await _wire_server(handler)
    r, w = await asyncio.open_connection(*listener.getsockname())
    payload = pattern(3 * MiB)
    w.write(payload)
    w.write_eof()
    assert await r.read() == b"%d" % len(payload)
    await done.wait()
    assert b"".join(got) == payload
    w.close()
    server.close()
    await server.wait_closed()


async def test_chunk_reader_pauses_the_socket_while_its_consumer_is_slow() -> None:
    reading = asyncio.Event()
    release = asyncio.Event()
    paused: list[bool] = []

    async def handler(reader: wire.ChunkReader, writer: asyncio.StreamWriter) -> None:
        reading.set()
        await release.wait()
        paused.append(not writer.transport.is_reading())  # type: ignore[attr-defined]
        total = 0
        while chunk := await reader.read():
            total += len(chunk)
        paused.append(not writer.transport.is_reading())  # type: ignore[attr-defined]
        writer.write(b"%d" % total)
        writer.close()

    listener, server = await _wire_server(handler)
    r, w = await asyncio.open_connection(*listener.getsockname())
    await reading.wait()
    payload = pattern(16 * MiB)
    w.write(payload)  # more than the queue, the socket buffers and the kernel's window together
    await asyncio.sleep(0.3)
    assert w.transport.get_write_buffer_size() > 0  # the reader stopped taking bytes
    release.set()
    w.write_eof()
    assert await r.read() == b"%d" % len(payload)
    assert paused == [True, False]
    w.close()
    server.close()
    await server.wait_closed()


async def test_chunk_reader_raises_when_the_peer_resets() -> None:
    failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(reader: wire.ChunkReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read():
                pass
        except ConnectionError as e:
            failed.set_result(e)
        else:
            failed.set_result(AssertionError("EOF instead of an error"))

    listener, server = await _wire_server(handler)
    s = socket.create_connection(listener.getsockname())
    s.sendall(b"x")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST
    assert isinstance(await asyncio.wait_for(failed, 5), ConnectionResetError)
    server.close()
    await server.wait_closed()


async def test_hand_off_delivers_early_bytes_first_then_the_end() -> None:
    a, b = socket.socketpair()
    reader, writer = await wire.open_connection(sock=a)
    b.sendall(b"early ")
    await asyncio.sleep(0.05)
    got: list[bytes] = []
    ends: list[str] = []
    protocol = writer.transport.get_protocol()
    assert isinstance(protocol, wire.BufferedPassThroughProtocol)
    protocol.hand_off(lambda view: got.append(bytes(view)), ends.append)
    b.sendall(b"late")
    b.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(reader.read(), 5)  # the StreamReader still learns about EOF
    assert b"".join(got) == b"early late" and ends == ["peer closed the connection"]
    writer.close()
    b.close()


# ============================================================================ HBONE over pass-through streams

async def _echo(request: ConnectRequest, respond: Respond) -> None:
    stream = await respond(200)
    assert stream is not None
    while data := await stream.read(256 * 1024):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


async def _pass_through_session() -> tuple[HboneConnection, asyncio.Task[str], asyncio.StreamWriter]:
    """An HBONE client and server on a socketpair, both over lab.hbone.wire streams."""
    a, b = socket.socketpair()
    cr, cw = await wire.open_connection(sock=a)
    sr, sw = await wire.accept_connection(b)
    server = asyncio.create_task(serve_hbone(sr, sw, _echo))
    return HboneConnection(cr, cw), server, sw


async def test_hbone_session_over_pass_through_streams_echoes_both_ways() -> None:
    conn, server, _ = await _pass_through_session()
    assert conn._reader_task is None  # fed by the protocol, no reading task

    async def one(i: int) -> bool:
        _, _, stream = await conn.connect_stream(f"10.244.1.{i}:9080")
        payload = pattern(5 * MiB, seed=i)  # more than a stream's window: flow control at work

        async def send() -> None:
            for off in range(0, len(payload), 300_000):
                stream.write(payload[off:off + 300_000])
                await stream.drain()
            stream.write_eof()

        sender = asyncio.create_task(send())
        echoed = await stream.read()
        await sender
        return echoed == payload

    assert await asyncio.gather(*(one(i) for i in range(3))) == [True] * 3
    await conn.aclose()
    assert "GOAWAY" in await asyncio.wait_for(server, 5)


async def test_hbone_session_over_pass_through_streams_ends_when_the_peer_goes() -> None:
    conn, server, sw = await _pass_through_session()
    _, _, stream = await conn.connect_stream("10.244.1.9:9080")
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)
    sw.transport.abort()
    await asyncio.wait_for(conn.closed.wait(), 5)
    assert conn.close_reason is not None
    with pytest.raises(ConnectionError):
        await stream.read()
    await conn.aclose()
