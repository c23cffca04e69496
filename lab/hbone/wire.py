"""The bytes under ztunnel's connections, handed on without a detour through a StreamReader.

asyncio's usual pair, a StreamReader fed by a StreamReaderProtocol, copies every received
chunk twice (into the reader's buffer, then out of it). ztunnel's data path has exactly one
consumer per connection, so these protocols give it the bytes as they came:

- `PassThroughProtocol`: each chunk the socket returned (a bytes object) is queued as it is;
  `ChunkReader.read()` hands it out without copying (the app side of a connection: what the
  copy loops of lab.hbone.stream and lab.ztunnel.proxy.relay read). Reading stops while more
  than QUEUE_HIGH bytes wait, as a StreamReader's would, so a slow consumer pushes back on TCP.
- `BufferedPassThroughProtocol`: for an HBONE connection. asyncio's TLS layer decrypts
  straight into its buffer (`SSLObject.read(n, buffer)`), and `hand_off(consumer, closed)`
  gives every chunk to the HTTP/2 session at once, which copies it into h2's frame buffer
  before it returns. Bytes that arrived before the hand-off are delivered first.

Writing still goes through an ordinary asyncio StreamWriter (drain, close, extra info).
ztunnel gets the same from Rust's tokio + rustls + hyper, which read into buffers they own.

`open_connection`, `accept_connection` and `start_server` are asyncio's functions of the
same names with these protocols. Their StreamReader gets EOF and errors only; the data go to
the ChunkReader or the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Awaitable, Callable

#: Bytes asked from TLS at once (the buffered protocol's buffer).
RECEIVE_BUFFER = 256 * 1024
#: Queued bytes above which reading from the socket pauses, and below which it resumes.
QUEUE_HIGH = 2 * 1024 * 1024
QUEUE_LOW = 1024 * 1024

Consumer = Callable[[memoryview], None]
Closed = Callable[[str], None]


class PassThroughProtocol(asyncio.StreamReaderProtocol):
    """A StreamReaderProtocol whose received bytes are queued for a ChunkReader or given to a consumer."""

    def __init__(self, reader: asyncio.StreamReader,
                 client_connected_cb: Callable[..., object] | None = None) -> None:
        super().__init__(reader, client_connected_cb)
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._consumer: Consumer | None = None
        self._closed_callback: Closed | None = None
        self._end: str | None = None  # why the connection ended, once it did
        self._error: BaseException | None = None

    def hand_off(self, consumer: Consumer, closed: Closed) -> None:
        """From now on, `consumer(bytes)` gets every received chunk and `closed(reason)` the end."""
        self._consumer, self._closed_callback = consumer, closed
        queue, self._queue, self._queued = self._queue, collections.deque(), 0
        for chunk in queue:
            consumer(memoryview(chunk))
        self._resume()
        if self._end is not None:
            closed(self._end)

    # ------------------------------------------------------------------ asyncio callbacks
    def data_received(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer(memoryview(data))
        else:
            self._enqueue(data)

    def eof_received(self) -> bool:
        self._ended("peer closed the connection", None)
        return super().eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(f"connection error: {exc!r}" if exc is not None else "peer closed the connection", exc)
        super().connection_lost(exc)

    # ------------------------------------------------------------------ the queue
    def _enqueue(self, data: bytes) -> None:
        self._queue.append(data)
        self._queued += len(data)
        self._wake()
        if self._queued > QUEUE_HIGH and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()  # type: ignore[attr-defined]

    def _resume(self) -> None:
        if self._reading_paused and self._queued <= QUEUE_LOW and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()  # type: ignore[attr-defined]

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _ended(self, reason: str, error: BaseException | None) -> None:
        if self._end is not None:
            return
        self._end, self._error = reason, error
        self._wake()
        if self._closed_callback is not None:
            self._closed_callback(reason)

    def chunk_reader(self) -> ChunkReader:
        return ChunkReader(self)


class BufferedPassThroughProtocol(PassThroughProtocol, asyncio.BufferedProtocol):
    """PassThroughProtocol that TLS decrypts into (its own reused buffer), for an HBONE connection."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = memoryview(bytearray(RECEIVE_BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._consumer is not None:
            self._consumer(self._buffer[:nbytes])
        else:
            self._enqueue(bytes(self._buffer[:nbytes]))


class ChunkReader:
    """The read side of a PassThroughProtocol connection, for code that pulls (like StreamReader.read)."""

    def __init__(self, protocol: PassThroughProtocol) -> None:
        self._protocol = protocol

    async def read(self, n: int = -1) -> bytes:
        """The next received chunk (at most n bytes if n > 0), or b"" at EOF; raises if the connection failed."""
        if n == 0:
            return b""
        p = self._protocol
        while not p._queue:
            if p._end is not None:
                if p._error is not None:
                    raise p._error
                return b""
            p._waiter = asyncio.get_running_loop().create_future()
            try:
                await p._waiter
            finally:
                p._waiter = None
        chunk = p._queue[0]
        if 0 < n < len(chunk):
            p._queue[0] = chunk[n:]
            chunk = chunk[:n]
        else:
            p._queue.popleft()
        p._queued -= len(chunk)
        p._resume()
        return chunk

    def at_eof(self) -> bool:
        return self._protocol._end is not None and not self._protocol._queue

    def exception(self) -> BaseException | None:
        return self._protocol._error


# ------------------------------------------------------------------ connecting and accepting
async def _connect(make_transport: Callable[[Callable[[], BufferedPassThroughProtocol]],
                                            Awaitable[tuple[asyncio.BaseTransport, object]]]
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over a BufferedPassThroughProtocol on the transport `make_transport` creates."""
    reader = asyncio.StreamReader()
    protocol = BufferedPassThroughProtocol(reader)
    transport, _ = await make_transport(lambda: protocol)
    return reader, asyncio.StreamWriter(transport, protocol, reader,  # type: ignore[arg-type]
                                        asyncio.get_running_loop())


async def open_connection(host: str | None = None, port: int | None = None, *,
                          sock: socket.socket | None = None, ssl: ssl.SSLContext | None = None,
                          server_hostname: str | None = None, local_addr: tuple[str, int] | None = None
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like asyncio.open_connection, with a BufferedPassThroughProtocol under the streams (for HBONE)."""
    loop = asyncio.get_running_loop()
    tls: dict[str, object] = {"ssl": ssl, "server_hostname": server_hostname} if ssl is not None else {}
    if sock is not None:
        return await _connect(lambda factory: loop.create_connection(factory, sock=sock, **tls))  # type: ignore
    return await _connect(lambda factory: loop.create_connection(factory, host, port, local_addr=local_addr,
                                                                 **tls))  # type: ignore


async def accept_connection(sock: socket.socket, *, ssl: ssl.SSLContext | None = None,
                            ssl_handshake_timeout: float | None = None
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The server side of an accepted socket (TLS handshake included), for HBONE."""
    loop = asyncio.get_running_loop()
    tls: dict[str, object] = ({"ssl": ssl, "ssl_handshake_timeout": ssl_handshake_timeout}
                              if ssl is not None else {})
    return await _connect(lambda factory: loop.connect_accepted_socket(factory, sock, **tls))  # type: ignore


async def start_server(client_connected_cb: Callable[[ChunkReader, asyncio.StreamWriter], Awaitable[None]], *,
                       sock: socket.socket, backlog: int = 100) -> asyncio.Server:
    """Like asyncio.start_server on a listening socket; each connection's reader is a ChunkReader."""
    loop = asyncio.get_running_loop()

    def factory() -> PassThroughProtocol:
        protocol: PassThroughProtocol | None = None

        def connected(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
            assert protocol is not None
            return client_connected_cb(protocol.chunk_reader(), writer)

        protocol = PassThroughProtocol(asyncio.StreamReader(), connected)
        return protocol

    return await loop.create_server(factory, sock=sock, backlog=backlog)
