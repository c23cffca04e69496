"""HBONE streams: one HTTP/2 CONNECT stream carries one application TCP connection
(ztunnel src/proxy/h2.rs `H2Stream`, `copy_bidirectional` in src/copy.rs).

This module holds what the client and the server side share:

- `HboneStream`: the body of one CONNECT stream, with the API of an asyncio
  StreamReader/StreamWriter pair (`read`, `write`, `drain`, `write_eof`, `close`).
- `H2Session`: one HTTP/2 connection (h2's sans-IO state machine) driven over an asyncio
  reader/writer pair (TLS in the lab, plain socketpairs in tests). Received bytes come
  straight from the protocol when the pair was made by lab.hbone.wire (as the lab's HBONE
  connections are), else a task reads them; one task sends the queued bytes of all streams
  as flow control allows.
- `copy_bidirectional`: relay bytes between a stream and a TCP connection with correct
  half-close.

Flow control is the backpressure of HBONE: the receiver hands credit back (WINDOW_UPDATE)
only when the *consumer* has read the bytes from `HboneStream.read`, not when they arrived.
A slow application therefore stops its sender after one window (4 MiB per stream, 16 MiB
per connection, the sizes ztunnel uses), instead of growing a buffer in the proxy.

Bulk data is where a Python proxy spends its time, so the payload is copied as little as
h2 allows: a stream queues the chunks it is given as they are, a DATA frame's payload goes
to TLS without being re-serialised (`HboneH2Connection`), and a received DATA frame's body
is copied once out of h2's buffer (`HboneFrameBuffer`). bench/bench_mesh.py measures it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame

from lab.hbone.wire import PassThroughProtocol

log = logging.getLogger("lab.hbone")

# HTTP/2 settings of ztunnel's HBONE (h2/client.rs, h2/server.rs).
STREAM_WINDOW = 4 * 1024 * 1024  # HTTP2_STREAM_WINDOW_SIZE
CONNECTION_WINDOW = 16 * 1024 * 1024  # HTTP2_CONNECTION_WINDOW_SIZE
MAX_FRAME_SIZE = 1024 * 1024  # HTTP2_FRAME_SIZE
MAX_HEADER_LIST_SIZE = 16 * 1024
MAX_CONCURRENT_STREAMS = 100  # POOL_MAX_STREAMS_PER_CONNECTION

#: bytes read from the transport at once, and a stream's send queue before drain() waits.
READ_SIZE = 256 * 1024
WRITE_HIGH_WATER = 1024 * 1024
#: how many bytes of one stream the sender sends before it turns to the next stream.
SEND_BUDGET = 1024 * 1024


class HboneError(Exception):
    """Base of the HBONE library's errors."""


class HboneStreamReset(HboneError, ConnectionResetError):
    """The stream was reset (RST_STREAM), by the peer or locally, or its connection died."""

    def __init__(self, error_code: int, detail: str = "") -> None:
        self.error_code = error_code
        try:
            name = ErrorCodes(error_code).name
        except ValueError:
            name = str(error_code)
        super().__init__(f"HBONE stream reset: {name}" + (f" ({detail})" if detail else ""))


class HboneConnectionLost(HboneStreamReset):
    """The HTTP/2 connection under the stream closed or failed."""

    def __init__(self, detail: str = "connection closed") -> None:
        super().__init__(ErrorCodes.CANCEL, detail)


def hbone_settings(client_side: bool, max_concurrent_streams: int = MAX_CONCURRENT_STREAMS) -> Settings:
    """The SETTINGS an HBONE endpoint advertises in its connection preface."""
    return Settings(client=client_side, initial_values={
        SettingCodes.ENABLE_PUSH: 0,
        SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
    })


def decode_headers(raw: Any) -> list[tuple[str, str]]:
    """h2 gives header names and values as bytes; the lab works with str."""
    out = []
    for k, v in raw:
        k = k.decode("ascii", "replace") if isinstance(k, bytes) else k
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        out.append((k, v))
    return out


def _no_payload_repr() -> str:
    return "data=<not shown>"


#: DATA payloads from this size on (one full TLS record) go to TLS as they are; smaller ones are
#: serialised with the frames around them, so a short message still leaves in one TLS record.
PASS_THROUGH_PAYLOAD = 16 * 1024
#: The 9-byte HTTP/2 frame header (RFC 9113 section 4.1): 24-bit length, type, flags, stream id.
_FRAME_HEADER = struct.Struct("!HBBBL")
_END_STREAM = 0x01


class HboneFrameBuffer(FrameBuffer):
    """h2's receive buffer, minus one copy of every DATA frame's payload.

    h2 slices each frame's body out of its buffer (a copy) before hyperframe copies it again
    into the frame. Here a DATA frame's body is parsed from a view of the buffer, so its
    payload is copied once; every other frame type takes h2's own path unchanged.
    """

    def __next__(self) -> Frame:
        buf = self._data
        if len(buf) < 9 or buf[3] != DataFrame.type:
            return super().__next__()
        length = int.from_bytes(buf[:3])
        if len(buf) < 9 + length:
            raise StopIteration
        frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
        self._validate_frame_length(length)
        try:
            with memoryview(buf) as view:
                frame.parse_body(view[9:9 + length])
        except InvalidDataError as err:
            raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from err
        except InvalidFrameError as err:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from err
        del buf[:9 + length]
        return self._update_header_buffer(frame) or self.__next__()  # raises inside a header block


class HboneH2Connection(h2.connection.H2Connection):
    """h2's connection, minus two hidden costs on the data path.

    Receiving: h2 formats every received frame for its trace log (`repr(frame)`) even when
    nobody logs; for a DATA frame hyperframe hex-encodes the whole payload to show 20
    characters of it. At 1 MiB frames that was more than half of HBONE's CPU time, so the
    payload is left out of the repr of DATA frames.

    Sending: h2 serialises each frame into one bytes object and appends it to one output
    buffer, which copies a DATA frame's payload three times before the TLS layer sees it.
    Here h2 still decides everything (windows, stream states, END_STREAM); only the bytes
    of a large DATA frame are handed on as two pieces, its 9-byte header (joined to the
    frames before it) and the payload object itself, in order with every other frame.
    `take_output()` returns those pieces, for a `writelines()` (TLS encrypts them in one go);
    `data_to_send()` still works and joins them.
    """

    def __init__(self, config: h2.config.H2Configuration | None = None) -> None:
        self._output: list[bytes | memoryview] = []  # pieces queued before _data_to_send
        super().__init__(config)
        self.incoming_buffer = HboneFrameBuffer(server=not self.config.client_side)

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        if isinstance(frame, DataFrame):
            frame._body_repr = _no_payload_repr  # type: ignore[method-assign]
        return super()._receive_frame(frame)  # type: ignore[no-any-return]

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        for frame in frames:
            if (type(frame) is DataFrame and len(frame.data) >= PASS_THROUGH_PAYLOAD
                    and not frame.pad_length and "PADDED" not in frame.flags):
                payload = frame.data
                length = len(payload)
                if length > self.max_outbound_frame_size:  # h2's own check, kept
                    raise h2.exceptions.FrameTooLargeError(f"DATA frame of {length} bytes")
                flags = _END_STREAM if "END_STREAM" in frame.flags else 0
                # frames queued earlier and this frame's header go first, as one piece
                self._data_to_send += _FRAME_HEADER.pack(length >> 8, length & 0xFF, 0, flags,
                                                         frame.stream_id & 0x7FFFFFFF)
                self._output.append(bytes(self._data_to_send))
                self._data_to_send.clear()
                self._output.append(payload)
            else:
                super()._prepare_for_sending([frame])

    def take_output(self) -> list[bytes | memoryview]:
        """Everything queued for the wire, in order, as pieces to write one after another."""
        out = self._output
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send.clear()
        self._output = []
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._output:
            self._data_to_send[:0] = b"".join(self._output)
            self._output = []
        return super().data_to_send(amount)  # type: ignore[no-any-return]

    def clear_outbound_data_buffer(self) -> None:
        self._output = []
        super().clear_outbound_data_buffer()


class HboneStream:
    """The body of one CONNECT stream, used like an asyncio StreamReader + StreamWriter.

    Reading returns the raw TCP bytes the peer sent; `b""` means the peer half-closed
    (END_STREAM). Writing queues bytes; `drain()` waits while more than WRITE_HIGH_WATER
    bytes are queued; `write_eof()` sends END_STREAM after the queued bytes (TCP half-close);
    `close()` abandons the stream with RST_STREAM(CANCEL).
    """

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.stream_id = stream_id
        self.bytes_sent = 0  # payload bytes handed to HTTP/2 (DATA frames)
        self.bytes_received = 0  # payload bytes received in DATA frames
        self.response_headers: list[tuple[str, str]] = []
        self._session = session
        self._rbuf: collections.deque[bytes] = collections.deque()
        self._roff = 0  # offset into _rbuf[0]
        self._rbuf_len = 0
        self._remote_ended = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._wbuf: collections.deque[bytes | memoryview] = collections.deque()  # queued, not yet framed
        self._wbuf_len = 0
        self._eof_requested = False
        self._local_ended = False
        self._error: HboneStreamReset | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.Event()  # set when both directions ended, or reset
        self._sent = asyncio.Event()  # set when the queue and END_STREAM went out, or reset

    def __repr__(self) -> str:
        return (f"<HboneStream {self.stream_id} sent={self.bytes_sent} "
                f"received={self.bytes_received} error={self._error}>")

    # ------------------------------------------------------------------ reading
    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (at least one), or b"" at end of stream; n < 0 reads to the end."""
        if n < 0:
            parts = []
            while chunk := await self.read(READ_SIZE):
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        while not self._rbuf:
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                return b""
            await self._wait_readable()
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly n bytes, or asyncio.IncompleteReadError at end of stream."""
        parts, got = [], 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    async def readuntil(self, separator: bytes = b"\n", limit: int = 64 * 1024) -> bytes:
        """Bytes up to and including separator (for parsing HTTP/1 heads inside a tunnel)."""
        data = bytearray()
        while True:
            start = max(0, len(data) - len(separator) + 1)
            chunk = await self.read(READ_SIZE)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(data), None)
            data += chunk
            idx = data.find(separator, start)
            if idx >= 0:
                end = idx + len(separator)
                self._unread(bytes(data[end:]))
                return bytes(data[:end])
            if len(data) > limit:
                self._unread(bytes(data))
                raise asyncio.LimitOverrunError("separator not found within limit", len(data))

    async def readline(self) -> bytes:
        """One line including b"\\n", or what is left at end of stream."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial

    def at_eof(self) -> bool:
        return self._remote_ended and not self._rbuf

    def _take(self, n: int) -> bytes:
        chunk = self._rbuf[0]
        if self._roff == 0 and n >= len(chunk):
            self._rbuf.popleft()
            out = chunk
        else:
            out = chunk[self._roff:self._roff + n]
            self._roff += len(out)
            if self._roff >= len(chunk):
                self._rbuf.popleft()
                self._roff = 0
        self._rbuf_len -= len(out)
        self._session._consumed(self, len(out))
        return out

    def _unread(self, data: bytes) -> None:
        """Put bytes back in front (their flow-control credit was already returned)."""
        if not data:
            return
        if self._roff:
            self._rbuf[0] = self._rbuf[0][self._roff:]
            self._roff = 0
        self._rbuf.appendleft(data)
        self._rbuf_len += len(data)

    async def _wait_readable(self) -> None:
        self._read_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # ------------------------------------------------------------------ writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for the peer (sent as DATA frames as flow control allows)."""
        if self._error is not None:
            raise self._error
        if self._eof_requested:
            raise HboneError("write after write_eof")
        if data:
            if not isinstance(data, bytes):  # the caller may reuse its buffer: keep a copy
                data = bytes(data)
            self._wbuf.append(data)
            self._wbuf_len += len(data)
            self._session._want_send(self)

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: END_STREAM after the queued bytes. Reading stays possible."""
        if self._eof_requested or self._error is not None:
            return
        self._eof_requested = True
        self._session._want_send(self)

    async def drain(self) -> None:
        """Wait until the send queue is below the high-water mark (or raise if reset)."""
        while self._error is None and self._wbuf_len > WRITE_HIGH_WATER:
            self._writable.clear()
            await self._writable.wait()
        if self._error is not None:
            raise self._error

    async def wait_sent(self) -> None:
        """Wait until everything queued and END_STREAM left, or the stream was reset."""
        await self._sent.wait()

    def close(self) -> None:
        """Abandon the stream: RST_STREAM(CANCEL) unless it already finished."""
        if self._closed.is_set():
            return
        self._session._reset(self, ErrorCodes.CANCEL)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def is_closing(self) -> bool:
        return self._closed.is_set() or self._error is not None

    @property
    def pending_write(self) -> int:
        return self._wbuf_len

    @property
    def error(self) -> HboneStreamReset | None:
        return self._error

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Like StreamWriter.get_extra_info, answered by the underlying connection."""
        return self._session.writer.get_extra_info(name, default)

    # ------------------------------------------------------------------ session callbacks
    def _has_output(self) -> bool:
        return self._error is None and (bool(self._wbuf) or (self._eof_requested and not self._local_ended))

    def _on_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if data:
            self._rbuf.append(data)
            self._rbuf_len += len(data)
        self._wake_reader()

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        self._wake_reader()
        self._maybe_closed()

    def _on_local_end(self) -> None:
        self._local_ended = True
        self._sent.set()
        self._maybe_closed()

    def _on_error(self, error: HboneStreamReset) -> None:
        if self._error is None:
            self._error = error
        self._wbuf.clear()
        self._wbuf_len = 0
        self._writable.set()
        self._sent.set()
        self._wake_reader()
        self._closed.set()

    def _maybe_closed(self) -> None:
        if self._local_ended and self._remote_ended:
            self._closed.set()


#: Queued pieces smaller than this are joined into one DATA frame; larger ones go out as they are.
SMALL_PIECE = 64 * 1024


def _take_frame_payload(queue: collections.deque[bytes | memoryview], n: int) -> bytes | memoryview:
    """Take at most n bytes off the front of a stream's send queue as one frame's payload.

    A large piece (what one read from the app returned) becomes a frame without being
    copied, or the first n bytes of it, as a view; small pieces are joined, so a stream of
    tiny writes still makes few frames.
    """
    first = queue[0]
    if len(first) >= SMALL_PIECE or len(queue) == 1:
        if len(first) <= n:
            return queue.popleft()
        view = first if isinstance(first, memoryview) else memoryview(first)
        queue[0] = view[n:]
        return view[:n]
    parts, size = [], 0
    while queue and size < n:
        piece = queue[0]
        if size + len(piece) <= n:
            parts.append(queue.popleft())
            size += len(piece)
        else:
            view = piece if isinstance(piece, memoryview) else memoryview(piece)
            parts.append(view[:n - size])
            queue[0] = view[n - size:]
            size = n
    return b"".join(parts)


class H2Session:
    """One HTTP/2 connection carrying HBONE streams, over an asyncio reader/writer pair.

    Subclasses (client and server) react to new requests/responses; this class handles
    framing, flow control, stream data and connection teardown.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: h2.connection.H2Connection, *, max_concurrent_streams: int) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.streams: dict[int, HboneStream] = {}
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self._pending: dict[int, HboneStream] = {}  # streams with bytes/EOF to send
        self._wake = asyncio.Event()
        conn.local_settings = hbone_settings(conn.config.client_side, max_concurrent_streams)
        conn.max_inbound_frame_size = MAX_FRAME_SIZE
        conn.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        self._reader_task: asyncio.Task[None] | None = None
        self._sender_task = asyncio.create_task(self._send_loop(), name="hbone-send")
        protocol = writer.transport.get_protocol()
        if isinstance(protocol, PassThroughProtocol):  # bytes come straight from TLS (lab.hbone.wire)
            protocol.hand_off(self._receive_wire_bytes, self._shutdown)
        else:  # any other asyncio stream pair: a task reads it
            self._reader_task = asyncio.create_task(self._read_loop(), name="hbone-read")

    # ------------------------------------------------------------------ plumbing
    def _flush(self) -> None:
        pieces = self.conn.take_output()
        if pieces and not self.writer.is_closing():
            if len(pieces) == 1:
                self.writer.write(pieces[0])
            else:
                self.writer.writelines(pieces)

    def _receive(self, data: bytes | memoryview) -> str | None:
        """Feed received bytes to h2 and act on its events; a reason when the connection must end."""
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 queues a GOAWAY for most errors, but not for a bad preface
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._flush()
            return f"HTTP/2 protocol error: {e}"
        for event in events:
            self._dispatch(event)
        self._flush()
        return self.close_reason

    def _receive_wire_bytes(self, data: memoryview) -> None:
        """PassThroughProtocol's consumer: runs inside asyncio's read callback."""
        if self.closed.is_set():
            return
        try:
            reason = self._receive(data)
        except Exception as e:  # noqa: BLE001 - a bug must end this connection, not the event loop's callback
            log.exception("HBONE connection failed while receiving")
            reason = f"internal error: {e!r}"
        if reason is not None:
            self._shutdown(reason)

    async def _read_loop(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                stop = self._receive(data)
                if stop is not None:
                    reason = stop
                    break
        except (ConnectionError, OSError, EOFError) as e:
            reason = f"connection error: {e!r}"
        except asyncio.CancelledError:
            reason = "closed locally"
            raise
        finally:
            self._shutdown(reason)

    async def _send_loop(self) -> None:
        try:
            while True:
                self._wake.clear()
                progressed = False
                for stream in list(self._pending.values()):
                    if self._send_from(stream):
                        progressed = True
                    if not stream._has_output():
                        self._pending.pop(stream.stream_id, None)
                self._flush()
                await self.writer.drain()
                if not progressed:
                    await self._wake.wait()
        except (ConnectionError, OSError) as e:
            self._shutdown(f"connection error while sending: {e!r}")
        except h2.exceptions.ProtocolError as e:
            self._shutdown(f"HTTP/2 protocol error while sending: {e}")

    def _send_from(self, stream: HboneStream) -> bool:
        """Send up to SEND_BUDGET bytes of one stream as its windows allow."""
        sid, sent_any = stream.stream_id, False
        budget = SEND_BUDGET
        try:
            while stream._wbuf and budget > 0:
                n = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size,
                        stream._wbuf_len, budget)
                if n <= 0:
                    break
                data = _take_frame_payload(stream._wbuf, n)
                n = len(data)
                stream._wbuf_len -= n
                end = stream._eof_requested and not stream._wbuf
                self.conn.send_data(sid, data, end_stream=end)
                stream.bytes_sent += n
                budget -= n
                sent_any = True
                if end:
                    stream._on_local_end()
            if not stream._wbuf and stream._eof_requested and not stream._local_ended:
                self.conn.end_stream(sid)
                stream._on_local_end()
                sent_any = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError) as e:
            stream._on_error(HboneStreamReset(ErrorCodes.STREAM_CLOSED, str(e)))
        if stream._wbuf_len <= WRITE_HIGH_WATER:
            stream._writable.set()
        if stream._closed.is_set():
            self._forget(stream)
        return sent_any

    def _want_send(self, stream: HboneStream) -> None:
        self._pending[stream.stream_id] = stream
        self._wake.set()

    def _consumed(self, stream: HboneStream, nbytes: int) -> None:
        """The consumer took nbytes: only now hand the flow-control credit back."""
        if nbytes and not self.closed.is_set():
            self.conn.acknowledge_received_data(nbytes, stream.stream_id)
            self._flush()

    def _reset(self, stream: HboneStream, error_code: int) -> None:
        if not self.closed.is_set():
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(stream.stream_id, error_code)
            self._give_back_unread(stream)
            self._flush()
        stream._on_error(HboneStreamReset(error_code, "reset locally"))
        self._forget(stream)

    def _give_back_unread(self, stream: HboneStream) -> None:
        """Unread bytes of a dead stream still count against the connection window."""
        unread, stream._rbuf_len = stream._rbuf_len, 0
        stream._rbuf.clear()
        stream._roff = 0
        if unread and not self.closed.is_set():
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(unread, stream.stream_id)

    def _forget(self, stream: HboneStream) -> None:
        self._pending.pop(stream.stream_id, None)
        if self.streams.pop(stream.stream_id, None) is not None:
            self._stream_finished(stream)

    def _stream_finished(self, stream: HboneStream) -> None:
        """Hook: a stream is fully closed (both ways, or reset)."""

    # ------------------------------------------------------------------ events
    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if stream is None or stream._error is not None:
                # Data for a stream nobody reads any more: return the credit at once.
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            if padding:
                self.conn.acknowledge_received_data(padding, event.stream_id)
            stream._on_data(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_remote_end()
                if stream._closed.is_set():
                    self._forget(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._give_back_unread(stream)
                stream._on_error(HboneStreamReset(event.error_code, "reset by peer"))
                self._on_stream_reset(stream, event.error_code)
                self._forget(stream)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close_reason = (f"GOAWAY from peer: {ErrorCodes(event.error_code).name} "
                                 f"last_stream_id={event.last_stream_id}")
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            self._on_response(event)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        """Hook for the server side."""
        self.conn.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_response(self, event: h2.events.Event) -> None:
        """Hook for the client side."""

    def _on_stream_reset(self, stream: HboneStream, error_code: int) -> None:
        """Hook: the peer reset a stream."""

    # ------------------------------------------------------------------ teardown
    def _shutdown(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        log.debug("HBONE connection closed: %s", reason)
        for stream in list(self.streams.values()):
            stream._on_error(HboneConnectionLost(reason))
            self._forget(stream)
        self._pending.clear()
        self._wake.set()
        for task in (self._reader_task, self._sender_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if not self.writer.is_closing():
            self.writer.close()

    async def aclose(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Close the connection: GOAWAY, then close the transport."""
        if not self.closed.is_set():
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code)
            self._flush()
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait_for(self.writer.drain(), 1.0)
            self._shutdown("closed locally")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        for task in (self._reader_task, self._sender_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def copy_bidirectional(stream: HboneStream, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter, *, chunk: int = READ_SIZE) -> tuple[int, int]:
    """Relay an HBONE stream and a TCP connection both ways (ztunnel src/copy.rs).

    Each direction ends with a half-close of the other side (END_STREAM <-> TCP FIN), never
    a close, so the reply still flows after the client finished sending. Returns
    `(bytes_sent, bytes_recv)`: bytes read from the TCP side and sent into the stream, and
    bytes received from the stream and written to the TCP side. Does not close `writer`.
    If either side fails, the stream is reset and the error re-raised.
    """
    sent = recv = 0

    async def tcp_to_stream() -> None:
        nonlocal sent
        while data := await reader.read(chunk):
            stream.write(data)
            sent += len(data)
            await stream.drain()
        stream.write_eof()
        await stream.wait_sent()
        if stream.error is not None:
            raise stream.error

    async def stream_to_tcp() -> None:
        nonlocal recv
        while data := await stream.read(chunk):
            writer.write(data)
            recv += len(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()

    tasks = [asyncio.create_task(tcp_to_stream()), asyncio.create_task(stream_to_tcp())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stream.close()
        raise
    return sent, recv
